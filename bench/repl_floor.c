/* The replication floor of workload b on this machine: the best that any
 * replicated 4 KiB write + fsync can do over the bench's own veth link and
 * disk, with no FUSE, no QUIC, no encryption and no threads.
 *
 *   repl_floor server FILE BIND_IP PORT     (in the mirror's namespace)
 *   repl_floor client FILE SERVER_IP PORT IOS
 *
 * Each operation of the client: pwrite 4 KiB at a random block of FILE (a
 * 64 MiB file, laid out and synced first, not timed), send the block and its
 * offset in one UDP datagram, fsync FILE, then wait for the server's answer.
 * The server writes the block into its own FILE, fsyncs it and answers. So
 * both copies are on the disk when an operation ends, as with hapair's sync
 * mode, and exactly one packet travels each way.
 *
 * The client prints the figures fio would (IOPS, bytes, fsync-to-done
 * latency percentiles) as fio-style JSON, so bench/report.py reads it like
 * the other targets' results. The server runs until it is killed or gets a
 * one-byte datagram. Malformed datagrams are ignored. Exit status 1 on any
 * I/O error, 2 on bad usage.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define FILE_BYTES (64L << 20)
#define BLOCK 4096
#define HEAD 16 /* u64 sequence number, u64 offset */
#define MAX_IOS 1000000L

static void die(const char *what) {
    fprintf(stderr, "repl_floor: %s: %s\n", what, strerror(errno));
    exit(1);
}

static uint64_t rng = 0x9e3779b97f4a7c15ULL;
static uint64_t next_rand(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

/* Opens FILE, laying it out (random data, synced) unless it is already full size. */
static int open_file(const char *path) {
    int fd = open(path, O_RDWR | O_CREAT, 0600);
    if (fd < 0) die(path);
    struct stat st;
    if (fstat(fd, &st) != 0) die("fstat");
    if (st.st_size < FILE_BYTES) {
        static char chunk[1 << 20];
        for (long off = 0; off < FILE_BYTES; off += (long)sizeof chunk) {
            for (size_t i = 0; i < sizeof chunk; i += 8) {
                uint64_t r = next_rand();
                memcpy(chunk + i, &r, 8);
            }
            if (pwrite(fd, chunk, sizeof chunk, off) != (ssize_t)sizeof chunk) die("laying out the file");
        }
        if (fsync(fd) != 0) die("fsync");
    }
    return fd;
}

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void usage(void) {
    fprintf(stderr, "usage: repl_floor server FILE BIND_IP PORT\n"
                    "       repl_floor client FILE SERVER_IP PORT IOS\n");
    exit(2);
}

static int serve(int fd, int s) {
    static char buf[HEAD + BLOCK];
    for (;;) {
        struct sockaddr_in from;
        socklen_t fl = sizeof from;
        ssize_t n = recvfrom(s, buf, sizeof buf, 0, (struct sockaddr *)&from, &fl);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("recvfrom");
        }
        if (n == 1) return 0;
        if (n != HEAD + BLOCK) continue;
        uint64_t off;
        memcpy(&off, buf + 8, 8);
        if (off % BLOCK != 0 || off > (uint64_t)(FILE_BYTES - BLOCK)) continue;
        if (pwrite(fd, buf + HEAD, BLOCK, (off_t)off) != BLOCK) die("server pwrite");
        if (fsync(fd) != 0) die("server fsync");
        if (sendto(s, buf, 8, 0, (struct sockaddr *)&from, fl) != 8) die("sendto");
    }
}

int main(int argc, char **argv) {
    if (argc < 5) usage();
    int server = strcmp(argv[1], "server") == 0;
    if (!server && (strcmp(argv[1], "client") != 0 || argc != 6)) usage();
    struct sockaddr_in sa = {.sin_family = AF_INET};
    char *end;
    long port = strtol(argv[4], &end, 10);
    if (*end || port < 1 || port > 65535) usage();
    sa.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, argv[3], &sa.sin_addr) != 1) usage();
    long ios = 0;
    if (!server) {
        ios = strtol(argv[5], &end, 10);
        if (*end || ios < 1 || ios > MAX_IOS) usage();
    }
    int fd = open_file(argv[2]);
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    if (s < 0) die("socket");
    if (server) {
        if (bind(s, (struct sockaddr *)&sa, sizeof sa) != 0) die("bind");
        return serve(fd, s);
    }
    if (connect(s, (struct sockaddr *)&sa, sizeof sa) != 0) die("connect");
    struct timeval tv = {.tv_sec = 2};
    if (setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) != 0) die("setsockopt");
    double *lat = malloc(sizeof(double) * (size_t)ios);
    if (!lat) die("malloc");
    static char buf[HEAD + BLOCK];
    for (size_t i = HEAD; i < sizeof buf; i++) buf[i] = (char)next_rand();
    double t0 = now_s();
    for (long i = 0; i < ios; i++) {
        uint64_t seq = (uint64_t)i, off = (next_rand() % (FILE_BYTES / BLOCK)) * BLOCK;
        memcpy(buf, &seq, 8);
        memcpy(buf + 8, &off, 8);
        if (pwrite(fd, buf + HEAD, BLOCK, (off_t)off) != BLOCK) die("pwrite");
        if (send(s, buf, sizeof buf, 0) != (ssize_t)sizeof buf) die("send");
        double f0 = now_s();
        if (fsync(fd) != 0) die("fsync");
        for (;;) {
            uint64_t got;
            ssize_t n = recv(s, &got, sizeof got, 0);
            if (n < 0) die("waiting for the server's answer");
            if (n == 8 && got == seq) break; /* anything else is stale: ignored */
        }
        lat[i] = now_s() - f0;
    }
    double t = now_s() - t0;
    qsort(lat, (size_t)ios, sizeof *lat, cmp_double);
    printf("{\"jobs\": [{\"jobname\": \"repl_floor\", \"job_runtime\": %.0f, "
           "\"write\": {\"iops\": %.1f, \"io_bytes\": %ld}, "
           "\"sync\": {\"lat_ns\": {\"percentile\": {\"50.000000\": %.0f, \"99.000000\": %.0f}}}}]}\n",
           t * 1e3, (double)ios / t, ios * BLOCK, lat[ios / 2] * 1e9, lat[(ios * 99) / 100] * 1e9);
    free(lat);
    return 0;
}
