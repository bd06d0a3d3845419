/* DEVLIST load generator for scripts/bench: K processes, each doing N
 * sequential connect / OP_REQ_DEVLIST / read-to-EOF / close rounds.
 * Prints "<requests> <seconds>" for the whole run.  Kept in C so that the
 * client, not the daemon under test, is never the bottleneck. */
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int one(struct sockaddr_in *sa) {
    static const unsigned char req[8] = {0x01, 0x11, 0x80, 0x05, 0, 0, 0, 0};
    unsigned char buf[4096], head[4] = {0};
    int fd = socket(AF_INET, SOCK_STREAM, 0), got = 0, n;
    if (fd < 0 || connect(fd, (struct sockaddr *)sa, sizeof *sa) < 0) { close(fd); return -1; }
    if (write(fd, req, sizeof req) != sizeof req) { close(fd); return -1; }
    while ((n = read(fd, buf, sizeof buf)) > 0) {
        for (int i = 0; i < n && got + i < 4; i++) head[got + i] = buf[i];
        got += n;
    }
    close(fd);
    /* OP_REP_DEVLIST, then a count and at least one 312-byte device record */
    return got >= 8 + 4 + 312 && head[2] == 0 && head[3] == 5 ? 0 : -1;
}

int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: %s PORT N K\n", argv[0]); return 2; }
    int port = atoi(argv[1]), n = atoi(argv[2]), k = atoi(argv[3]), bad = 0;
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
    double t0 = now();
    for (int p = 0; p < k; p++) {
        if (fork() == 0) {
            int errs = 0;
            for (int i = 0; i < n; i++) errs += one(&sa) != 0;
            _exit(errs > 0);
        }
    }
    for (int p = 0; p < k; p++) { int st; wait(&st); bad |= !WIFEXITED(st) || WEXITSTATUS(st); }
    printf("%d %.3f\n", n * k, now() - t0);
    return bad;
}
