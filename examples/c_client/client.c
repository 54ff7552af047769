/*
 * A minimal SPU host in C, written from firmware_spec/PROTOCOL.md alone: libc and POSIX sockets.
 *
 *   cc -std=c99 -Wall -Wextra -O2 -o spu_client client.c
 *   spu serve spu-8 --seed 0 --port 7070 &
 *   ./spu_client 127.0.0.1 7070
 *
 * It sends INFO (and reads the spec's code widths from its nested maps), RESET, LOAD_MATRIX with
 * A = [[1, 1/4], [1/4, 1]] g_max, LOAD_VECTOR with u = [1/4, -1/4] range_v, RUN (t = 20 tau,
 * burn_in = 10 tau) and READ_MEAN, and prints what it sent and the mean ADC codes, each as a C99
 * hex float (%a: every bit, so a test can compare them with another host's).  Codes follow the
 * protocol's code meaning: code = round(fraction * code_max), code_max = 2^(bits-1) - 1, sent in
 * the narrowest integer type.  Exit 0 on success, 1 when the device refuses or the link fails,
 * 2 on a bad command line.
 */
#define _POSIX_C_SOURCE 200112L
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <unistd.h>

enum { HEADER_BYTES = 28, MAX_REPLY = 1 << 20 };
enum { OP_INFO = 1, OP_RESET = 2, OP_LOAD_MATRIX = 3, OP_LOAD_VECTOR = 4, OP_RUN = 5, OP_READ_MEAN = 6 };
enum { T_INT = 1, T_FLOAT = 2, T_BOOL = 3, T_STR = 4, T_ARRAY = 5, T_MAP = 6 };
enum { D_INT64 = 1, D_FLOAT64 = 2, D_INT8 = 3, D_INT16 = 4, D_INT32 = 5 };

static void die(const char *what) {
    fprintf(stderr, "spu_client: %s\n", what);
    exit(1);
}

/* CRC-32/ISO-HDLC (zlib's crc32), bitwise: small frames, no table needed */
static uint32_t crc32(const uint8_t *data, size_t len) {
    uint32_t crc = 0xFFFFFFFFu;
    for (size_t i = 0; i < len; i++) {
        crc ^= data[i];
        for (int k = 0; k < 8; k++) crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
    }
    return ~crc;
}

/* little-endian stores and loads, whatever the host's byte order */
static void put_le(uint8_t *p, uint64_t v, int n) {
    for (int i = 0; i < n; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static uint64_t get_le(const uint8_t *p, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; i++) v |= (uint64_t)p[i] << (8 * i);
    return v;
}
static double get_f64(const uint8_t *p) {
    uint64_t bits = get_le(p, 8);
    double d;
    memcpy(&d, &bits, 8);
    return d;
}

/* -- building a payload: fields appended to one buffer; offsets count from the payload's start -- */
typedef struct {
    uint8_t data[4096];
    size_t len;
} payload_t;

static void begin(payload_t *p, int fields) {
    p->len = 0;
    put_le(p->data, (uint64_t)fields, 2);
    p->len = 2;
}
static void name_tag(payload_t *p, const char *name, int tag) {
    size_t n = strlen(name);
    p->data[p->len++] = (uint8_t)n;
    memcpy(p->data + p->len, name, n);
    p->len += n;
    p->data[p->len++] = (uint8_t)tag;
}
static void add_f64(payload_t *p, const char *name, double v) {
    uint64_t bits;
    memcpy(&bits, &v, 8);
    name_tag(p, name, T_FLOAT);
    put_le(p->data + p->len, bits, 8);
    p->len += 8;
}
/* an integer array of itemsize 1, 2 or 4 (dtype int8, int16, int32) */
static void add_codes(payload_t *p, const char *name, const long *codes, int ndim, const uint32_t *dims, int itemsize) {
    size_t count = 1;
    name_tag(p, name, T_ARRAY);
    p->data[p->len++] = (uint8_t)(itemsize == 1 ? D_INT8 : itemsize == 2 ? D_INT16 : D_INT32);
    p->data[p->len++] = (uint8_t)ndim;
    for (int i = 0; i < ndim; i++) {
        put_le(p->data + p->len, dims[i], 4);
        p->len += 4;
        count *= dims[i];
    }
    while (p->len % 8) p->data[p->len++] = 0; /* padding: from the payload's start */
    for (size_t i = 0; i < count; i++) {
        put_le(p->data + p->len, (uint64_t)codes[i], itemsize);
        p->len += (size_t)itemsize;
    }
}

/* -- reading a payload: find a field by dotted path (maps nest), skipping the others -- */
typedef struct {
    int tag;
    const uint8_t *value; /* an int's or float's 8 bytes, a string's bytes, an array's data */
    uint32_t size;        /* a string's length, an array's element count */
    int dtype;
} field_t;

static size_t skip_map(const uint8_t *p, size_t len, size_t at, int depth);

/* the end of the value of type ``tag`` at ``at``; fills *f with it */
static size_t value_at(const uint8_t *p, size_t len, size_t at, int tag, field_t *f, int depth) {
    static const int itemsize[] = {0, 8, 8, 1, 2, 4};
    f->tag = tag;
    f->value = p + at;
    switch (tag) {
    case T_INT:
    case T_FLOAT: return at + 8;
    case T_BOOL: return at + 1;
    case T_STR:
        if (at + 4 > len) die("reply ends inside a string");
        f->size = (uint32_t)get_le(p + at, 4);
        f->value = p + at + 4;
        return at + 4 + f->size;
    case T_ARRAY: {
        if (at + 2 > len) die("reply ends inside an array");
        int dtype = p[at], ndim = p[at + 1];
        size_t count = 1;
        at += 2;
        if (dtype < 1 || dtype > 5 || at + 4u * (size_t)ndim > len) die("reply holds a bad array");
        for (int i = 0; i < ndim; i++, at += 4) count *= get_le(p + at, 4);
        at += (8 - at % 8) % 8; /* padding to a multiple of 8 from the payload's start */
        f->dtype = dtype;
        f->size = (uint32_t)count;
        f->value = p + at;
        return at + count * (size_t)itemsize[dtype];
    }
    case T_MAP: return skip_map(p, len, at, depth + 1);
    default: die("reply holds an unknown type tag");
    }
    return len;
}

static size_t skip_map(const uint8_t *p, size_t len, size_t at, int depth) {
    field_t ignored;
    if (depth > 4 || at + 2 > len) die("reply nests too deep or ends early");
    int count = (int)get_le(p + at, 2);
    at += 2;
    for (int i = 0; i < count; i++) {
        at += 1 + p[at];
        at = value_at(p, len, at + 1, p[at], &ignored, depth);
        if (at > len) die("reply field runs past the payload");
    }
    return at;
}

/* the field at dotted ``path`` (e.g. "spec.coupling.element_bits") of the map at ``at``; 0 if absent */
static int find(const uint8_t *p, size_t len, size_t at, const char *path, field_t *out) {
    const char *dot = strchr(path, '.');
    size_t want = dot ? (size_t)(dot - path) : strlen(path);
    if (len < 2) return 0;
    int count = (int)get_le(p + at, 2);
    at += 2;
    for (int i = 0; i < count; i++) {
        size_t n = p[at];
        int match = n == want && memcmp(p + at + 1, path, n) == 0;
        at += 1 + n;
        int tag = p[at];
        if (match && dot && tag == T_MAP) return find(p, len, at + 1, dot + 1, out);
        if (match && !dot) {
            value_at(p, len, at + 1, tag, out, 0);
            return 1;
        }
        field_t ignored;
        at = value_at(p, len, at + 1, tag, &ignored, 0);
    }
    return 0;
}

/* -- one exchange -- */
static uint8_t reply[MAX_REPLY];
static uint32_t next_id = 1;

static void read_all(int fd, uint8_t *p, size_t n) {
    while (n > 0) {
        ssize_t got = recv(fd, p, n, 0);
        if (got <= 0) die("the device closed the connection");
        p += got;
        n -= (size_t)got;
    }
}

/* send (opcode, payload); return the reply payload's length (in ``reply``), exit on a refusal */
static size_t exchange(int fd, int opcode, const payload_t *payload) {
    uint8_t frame[HEADER_BYTES + sizeof(((payload_t *)0)->data)];
    size_t len = payload ? payload->len : 0;
    uint32_t id = next_id++;
    memcpy(frame, "SPUW", 4);
    frame[4] = 1; /* protocol_version */
    frame[5] = 0; /* kind: request */
    put_le(frame + 6, (uint64_t)opcode, 2);
    put_le(frame + 8, 0, 2);  /* status */
    put_le(frame + 10, 0, 2); /* reserved */
    put_le(frame + 12, id, 4);
    put_le(frame + 16, len, 4);
    put_le(frame + 20, len ? crc32(payload->data, len) : 0, 4);
    put_le(frame + 24, crc32(frame, 24), 4);
    if (len) memcpy(frame + HEADER_BYTES, payload->data, len);
    if (send(fd, frame, HEADER_BYTES + len, 0) != (ssize_t)(HEADER_BYTES + len)) die("send failed");

    uint8_t head[HEADER_BYTES];
    read_all(fd, head, HEADER_BYTES);
    if (memcmp(head, "SPUW", 4) != 0 || head[5] != 1) die("the reply is not a reply frame");
    if (crc32(head, 24) != get_le(head + 24, 4)) die("the reply's header CRC does not match");
    size_t reply_len = get_le(head + 16, 4);
    if (reply_len > MAX_REPLY) die("the reply is larger than this client takes");
    read_all(fd, reply, reply_len);
    if ((reply_len ? crc32(reply, reply_len) : 0) != get_le(head + 20, 4)) die("the reply's payload CRC does not match");
    if (get_le(head + 6, 2) != (uint64_t)opcode || get_le(head + 12, 4) != id) die("the reply is for another request");
    int status = (int)get_le(head + 8, 2);
    if (status != 0) {
        field_t message;
        if (find(reply, reply_len, 0, "message", &message) && message.tag == T_STR)
            fprintf(stderr, "spu_client: opcode %d refused, status %d: %.*s\n", opcode, status, (int)message.size,
                    (const char *)message.value);
        exit(1);
    }
    return reply_len;
}

static long int_field(size_t len, const char *path) {
    field_t f;
    if (!find(reply, len, 0, path, &f) || f.tag != T_INT) {
        fprintf(stderr, "spu_client: the reply has no int field %s\n", path);
        exit(1);
    }
    return (long)(int64_t)get_le(f.value, 8);
}

static int connect_to(const char *host, const char *port) {
    struct addrinfo hints, *found, *a;
    memset(&hints, 0, sizeof hints);
    hints.ai_socktype = SOCK_STREAM;
    if (getaddrinfo(host, port, &hints, &found) != 0) die("cannot resolve the address");
    int fd = -1;
    for (a = found; a && fd < 0; a = a->ai_next) {
        fd = socket(a->ai_family, a->ai_socktype, a->ai_protocol);
        if (fd >= 0 && connect(fd, a->ai_addr, a->ai_addrlen) != 0) {
            close(fd);
            fd = -1;
        }
    }
    freeaddrinfo(found);
    if (fd < 0) die("cannot connect");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

/* round(code_max * num / den) for the fractions used here, num/den >= 0, in integers */
static long code_of(long code_max, long num, long den) {
    return (2 * code_max * num + den) / (2 * den);
}

static int itemsize_of(long bits) {
    return bits <= 8 ? 1 : bits <= 16 ? 2 : 4;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s HOST PORT\n", argv[0]);
        return 2;
    }
    int fd = connect_to(argv[1], argv[2]);
    payload_t p;

    size_t len = exchange(fd, OP_INFO, NULL);
    field_t name;
    if (!find(reply, len, 0, "spec.name", &name) || name.tag != T_STR) die("INFO has no spec.name");
    long element_bits = int_field(len, "spec.coupling.element_bits");
    long dac_bits = int_field(len, "spec.dac.bits");
    printf("device %.*s protocol_version %ld element_bits %ld dac_bits %ld\n", (int)name.size,
           (const char *)name.value, int_field(len, "protocol_version"), element_bits, dac_bits);
    if (element_bits < 2 || element_bits > 32 || dac_bits < 2 || dac_bits > 32)
        die("this client takes quantised parts of 2 to 32 bits only");

    exchange(fd, OP_RESET, NULL);

    long element_max = (1L << (element_bits - 1)) - 1, dac_max = (1L << (dac_bits - 1)) - 1;
    long a[4] = {element_max, code_of(element_max, 1, 4), code_of(element_max, 1, 4), element_max};
    long u[2] = {code_of(dac_max, 1, 4), -code_of(dac_max, 1, 4)};
    uint32_t dims_a[2] = {2, 2}, dims_u[1] = {2};
    begin(&p, 1);
    add_codes(&p, "codes", a, 2, dims_a, itemsize_of(element_bits));
    exchange(fd, OP_LOAD_MATRIX, &p);
    begin(&p, 1);
    add_codes(&p, "codes", u, 1, dims_u, itemsize_of(dac_bits));
    exchange(fd, OP_LOAD_VECTOR, &p);
    printf("matrix_codes %ld %ld %ld %ld\nvector_codes %ld %ld\n", a[0], a[1], a[2], a[3], u[0], u[1]);

    double t = 20.0, burn_in = 10.0;
    begin(&p, 2);
    add_f64(&p, "t", t);
    add_f64(&p, "burn_in", burn_in);
    len = exchange(fd, OP_RUN, &p);
    printf("run t %a burn_in %a samples %ld\n", t, burn_in, int_field(len, "samples"));

    len = exchange(fd, OP_READ_MEAN, NULL);
    field_t mean;
    if (!find(reply, len, 0, "mean_codes", &mean) || mean.tag != T_ARRAY || mean.dtype != D_FLOAT64)
        die("READ_MEAN has no float64 mean_codes");
    printf("mean_codes");
    for (uint32_t i = 0; i < mean.size; i++) printf(" %a", get_f64(mean.value + 8 * i));
    printf("\n");
    close(fd);
    return 0;
}
