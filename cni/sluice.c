// SPDX-License-Identifier: Apache-2.0
/* sluice: the CNI plugin a container runtime executes for every pod.
 *
 * It answers VERSION itself and hands every other command to the Sluice agent over its Unix socket
 * (src/sluice/agent_protocol.py): one JSON line {"op": "cni", "command", "env", "stdin"} out, one
 * JSON line back, whose "output" it prints (the result, or the error result the agent rendered) and
 * whose "ok" gives the exit status. The agent checks the request; this program checks only what it
 * must to send it (the configuration is UTF-8) and reads only "agentSocket" and "cniVersion" of the
 * configuration, for the socket and for the errors it reports itself when the agent cannot answer.
 * The constants it shares with the agent come from protocol.h, generated from agent_protocol.py.
 *
 * C rather than Python: a runtime starts it once per pod, and an interpreter's start-up alone cost
 * more than the reference Go plugins' whole VERSION call (bench/README.md).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "protocol.h"

extern char **environ;

struct buf {
    char *data;
    size_t len, cap;
};

static void put(struct buf *b, const char *data, size_t len)
{
    if (b->len + len + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (b->len + len + 1 > cap)
            cap *= 2;
        char *grown = realloc(b->data, cap);
        if (!grown) {
            fputs("sluice: out of memory\n", stderr);
            exit(1);
        }
        b->data = grown;
        b->cap = cap;
    }
    memcpy(b->data + b->len, data, len);
    b->len += len;
    b->data[b->len] = '\0';
}

static void puts_buf(struct buf *b, const char *s) { put(b, s, strlen(s)); }

/* ---- UTF-8 and JSON strings --------------------------------------------------------------- */

/* Length of the UTF-8 sequence at s (at most n bytes) and its code point; 0 when it is not UTF-8. */
static size_t utf8_decode(const unsigned char *s, size_t n, unsigned *cp)
{
    size_t len;
    unsigned min;
    if (s[0] < 0x80) {
        *cp = s[0];
        return 1;
    } else if ((s[0] & 0xE0) == 0xC0) {
        len = 2, min = 0x80, *cp = s[0] & 0x1F;
    } else if ((s[0] & 0xF0) == 0xE0) {
        len = 3, min = 0x800, *cp = s[0] & 0x0F;
    } else if ((s[0] & 0xF8) == 0xF0) {
        len = 4, min = 0x10000, *cp = s[0] & 0x07;
    } else {
        return 0;
    }
    if (len > n)
        return 0;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80)
            return 0;
        *cp = (*cp << 6) | (s[i] & 0x3F);
    }
    if (*cp < min || *cp > 0x10FFFF || (*cp >= 0xD800 && *cp <= 0xDFFF))
        return 0;
    return len;
}

/* Offset of the first byte that is not UTF-8, or -1. */
static long utf8_invalid_at(const char *s, size_t n)
{
    unsigned cp;
    for (size_t i = 0; i < n;) {
        size_t len = utf8_decode((const unsigned char *)s + i, n - i, &cp);
        if (!len)
            return (long)i;
        i += len;
    }
    return -1;
}

/* A JSON string of valid UTF-8 s, as Python's json.dumps writes it (ensure_ascii). */
static void put_json_string(struct buf *b, const char *s, size_t n)
{
    char esc[16];
    unsigned cp;
    put(b, "\"", 1);
    for (size_t i = 0; i < n;) {
        size_t len = utf8_decode((const unsigned char *)s + i, n - i, &cp);
        if (!len) { /* not reached for checked input: keep the byte's code point */
            cp = (unsigned char)s[i];
            len = 1;
        }
        i += len;
        switch (cp) {
        case '"': puts_buf(b, "\\\""); continue;
        case '\\': puts_buf(b, "\\\\"); continue;
        case '\n': puts_buf(b, "\\n"); continue;
        case '\r': puts_buf(b, "\\r"); continue;
        case '\t': puts_buf(b, "\\t"); continue;
        case '\b': puts_buf(b, "\\b"); continue;
        case '\f': puts_buf(b, "\\f"); continue;
        }
        if (cp >= 0x20 && cp < 0x7F) {
            char c = (char)cp;
            put(b, &c, 1);
        } else if (cp < 0x10000) {
            snprintf(esc, sizeof esc, "\\u%04x", cp);
            puts_buf(b, esc);
        } else {
            cp -= 0x10000;
            snprintf(esc, sizeof esc, "\\u%04x\\u%04x", 0xD800 | (cp >> 10), 0xDC00 | (cp & 0x3FF));
            puts_buf(b, esc);
        }
    }
    put(b, "\"", 1);
}

/* s[0..n) as Python's repr() of a str would show it (the message names the bad text as the agent would). */
static void put_repr(struct buf *b, const char *s, size_t n)
{
    char quote = memchr(s, '\'', n) && !memchr(s, '"', n) ? '"' : '\'';
    char esc[16];
    put(b, &quote, 1);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '\\' || c == (unsigned char)quote) {
            put(b, "\\", 1);
            put(b, (char *)&c, 1);
        } else if (c == '\n') {
            puts_buf(b, "\\n");
        } else if (c == '\r') {
            puts_buf(b, "\\r");
        } else if (c == '\t') {
            puts_buf(b, "\\t");
        } else if (c < 0x20 || c == 0x7F) {
            snprintf(esc, sizeof esc, "\\x%02x", c);
            puts_buf(b, esc);
        } else {
            put(b, (char *)&c, 1);      /* UTF-8 sequences as they are: checked before */
        }
    }
    put(b, &quote, 1);
}

static void put_utf8(struct buf *b, unsigned cp)
{
    char out[4];
    size_t n;
    if (cp < 0x80) {
        out[0] = (char)cp, n = 1;
    } else if (cp < 0x800) {
        out[0] = (char)(0xC0 | cp >> 6), out[1] = (char)(0x80 | (cp & 0x3F)), n = 2;
    } else if (cp < 0x10000) {
        out[0] = (char)(0xE0 | cp >> 12), out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F)), n = 3;
    } else {
        out[0] = (char)(0xF0 | cp >> 18), out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
        out[2] = (char)(0x80 | ((cp >> 6) & 0x3F)), out[3] = (char)(0x80 | (cp & 0x3F)), n = 4;
    }
    put(b, out, n);
}

/* ---- reading JSON: just enough to take top-level members of an object ----------------------- */

struct json {
    const char *p, *end;
};

static void skip_ws(struct json *j)
{
    while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r'))
        j->p++;
}

static int hex4(const char *p, unsigned *v)
{
    *v = 0;
    for (int i = 0; i < 4; i++) {
        char c = p[i];
        *v <<= 4;
        if (c >= '0' && c <= '9') *v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') *v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') *v |= (unsigned)(c - 'A' + 10);
        else return -1;
    }
    return 0;
}

/* A string at j->p; decoded into out (when not NULL). 0, or -1 when it is not a JSON string. */
static int parse_string(struct json *j, struct buf *out)
{
    if (j->p >= j->end || *j->p != '"')
        return -1;
    j->p++;
    while (j->p < j->end) {
        char c = *j->p++;
        if (c == '"')
            return 0;
        if ((unsigned char)c < 0x20)
            return -1;
        if (c != '\\') {
            if (out)
                put(out, &c, 1);
            continue;
        }
        if (j->p >= j->end)
            return -1;
        c = *j->p++;
        const char *plain = strchr("\"\\/bfnrt", c);
        if (c && plain) {
            if (out)
                put(out, &"\"\\/\b\f\n\r\t"[plain - "\"\\/bfnrt"], 1);
            continue;
        }
        unsigned cp, low;
        if (c != 'u' || j->end - j->p < 4 || hex4(j->p, &cp))
            return -1;
        j->p += 4;
        if (cp >= 0xD800 && cp <= 0xDBFF && j->end - j->p >= 6 && j->p[0] == '\\' && j->p[1] == 'u'
            && !hex4(j->p + 2, &low) && low >= 0xDC00 && low <= 0xDFFF) {
            cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
            j->p += 6;
        }
        if (out)
            put_utf8(out, cp);
    }
    return -1;
}

static int skip_word(struct json *j, const char *word)
{
    size_t n = strlen(word);
    if ((size_t)(j->end - j->p) < n || strncmp(j->p, word, n))
        return -1;
    j->p += n;
    return 0;
}

static int skip_digits(struct json *j)
{
    const char *start = j->p;
    while (j->p < j->end && *j->p >= '0' && *j->p <= '9')
        j->p++;
    return j->p > start ? 0 : -1;
}

/* A number as JSON writes it, or what Python's json also reads: NaN, Infinity, -Infinity. */
static int skip_number(struct json *j)
{
    if (j->p < j->end && *j->p == '-')
        j->p++;
    if (!skip_word(j, "Infinity"))
        return 0;
    if (j->p < j->end && *j->p == '0')
        j->p++;
    else if (skip_digits(j))
        return -1;
    if (j->p < j->end && *j->p == '.') {
        j->p++;
        if (skip_digits(j))
            return -1;
    }
    if (j->p < j->end && (*j->p == 'e' || *j->p == 'E')) {
        j->p++;
        if (j->p < j->end && (*j->p == '+' || *j->p == '-'))
            j->p++;
        if (skip_digits(j))
            return -1;
    }
    return 0;
}

/* Past the JSON value at j->p. 0, or -1 when there is none. */
static int skip_value(struct json *j, int depth)
{
    skip_ws(j);
    if (j->p >= j->end || depth > 512)
        return -1;
    char open = *j->p;
    if (open == '"')
        return parse_string(j, NULL);
    if (open == 't')
        return skip_word(j, "true");
    if (open == 'f')
        return skip_word(j, "false");
    if (open == 'n')
        return skip_word(j, "null");
    if (open == 'N')
        return skip_word(j, "NaN");
    if (open != '{' && open != '[')
        return skip_number(j);
    char close = open == '{' ? '}' : ']';
    j->p++;
    skip_ws(j);
    if (j->p < j->end && *j->p == close) {
        j->p++;
        return 0;
    }
    for (;;) {
        if (open == '{') {
            skip_ws(j);
            if (parse_string(j, NULL))
                return -1;
            skip_ws(j);
            if (j->p >= j->end || *j->p++ != ':')
                return -1;
        }
        if (skip_value(j, depth + 1))
            return -1;
        skip_ws(j);
        if (j->p >= j->end)
            return -1;
        char c = *j->p++;
        if (c == close)
            return 0;
        if (c != ',')
            return -1;
    }
}

/* Where the JSON text[0..n) stops being JSON (its length when it is one value and nothing more). */
static size_t json_end(const char *text, size_t n)
{
    struct json j = {text, text + n};
    if (!skip_value(&j, 0)) {
        skip_ws(&j);
        if (j.p == j.end)
            return n;
    }
    return (size_t)(j.p - text);
}

/* The top-level member `key` of the JSON object text[0..n): its value's text in *value (start, length).
 * 1 found, 0 not there, -1 when the text is not a JSON object. */
static int member(const char *text, size_t n, const char *key, const char **value, size_t *value_len)
{
    struct json j = {text, text + n};
    struct buf name = {0};
    int found = 0;
    skip_ws(&j);
    if (j.p >= j.end || *j.p++ != '{')
        return -1;
    skip_ws(&j);
    if (j.p < j.end && *j.p == '}')
        return 0;
    for (;;) {
        skip_ws(&j);
        name.len = 0;
        if (parse_string(&j, &name))
            goto bad;
        skip_ws(&j);
        if (j.p >= j.end || *j.p++ != ':')
            goto bad;
        skip_ws(&j);
        const char *start = j.p;
        if (skip_value(&j, 0))
            goto bad;
        if (!found && name.data && strlen(name.data) == name.len && !strcmp(name.data, key)) {
            *value = start;
            *value_len = (size_t)(j.p - start);
            found = 1;
        }
        skip_ws(&j);
        if (j.p >= j.end)
            goto bad;
        char c = *j.p++;
        if (c == '}')
            break;
        if (c != ',')
            goto bad;
    }
    free(name.data);
    return found;
bad:
    free(name.data);
    return -1;
}

/* The top-level string member `key`, decoded into out: 1, or 0 when absent or not a string. */
static int string_member(const char *text, size_t n, const char *key, struct buf *out)
{
    const char *value;
    size_t len;
    if (member(text, n, key, &value, &len) != 1)
        return 0;
    struct json j = {value, value + len};
    out->len = 0;
    put(out, "", 0);
    return parse_string(&j, out) == 0;
}

/* ---- talking to the agent ----------------------------------------------------------------- */

static const char *config_version = SL_CNI_VERSION;     /* of the errors this program reports */

/* Print an error result and return the plugin's exit status for it. */
static int fail(int code, const char *format, ...)
{
    char msg[2048];
    va_list ap;
    va_start(ap, format);
    vsnprintf(msg, sizeof msg, format, ap);
    va_end(ap);
    struct buf out = {0};
    puts_buf(&out, "{\"cniVersion\": ");
    put_json_string(&out, config_version, strlen(config_version));
    char head[64];
    snprintf(head, sizeof head, ", \"code\": %d, \"msg\": ", code);
    puts_buf(&out, head);
    put_json_string(&out, msg, strlen(msg));
    puts_buf(&out, "}\n");
    fwrite(out.data, 1, out.len, stdout);
    return 1;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(void)
{
    const char *command = getenv("CNI_COMMAND");
    if (command && !strcmp(command, "VERSION")) {
        puts(SL_VERSION_OUTPUT);
        return 0;
    }

    struct buf conf = {0};
    char chunk[65536];
    ssize_t got;
    put(&conf, "", 0);
    while ((got = read(STDIN_FILENO, chunk, sizeof chunk)) != 0) {
        if (got < 0) {
            if (errno == EINTR)
                continue;
            return fail(SL_IO_FAILURE, "reading the network configuration: %s", strerror(errno));
        }
        put(&conf, chunk, (size_t)got);
    }
    long bad = utf8_invalid_at(conf.data, conf.len);
    if (bad >= 0)
        return fail(SL_DECODING_FAILURE, "the network configuration is not UTF-8: byte 0x%02x at offset %ld",
                    (unsigned char)conf.data[bad], bad);

    /* What the agent would refuse too, but the socket to ask it is in the configuration. */
    size_t end = json_end(conf.data, conf.len);
    if (end < conf.len) {
        struct buf near = {0};
        size_t from = end > 20 ? end - 20 : 0, to = end + 20 < conf.len ? end + 20 : conf.len;
        put_repr(&near, conf.data + from, to - from);
        char reason[64];
        snprintf(reason, sizeof reason, "unexpected text at character %zu", end);
        return fail(SL_DECODING_FAILURE, SL_NOT_JSON, reason, near.data);
    }
    const char *unused;
    size_t unused_len;
    if (member(conf.data, conf.len, "cniVersion", &unused, &unused_len) < 0)
        return fail(SL_DECODING_FAILURE, SL_NOT_OBJECT);

    static const char *const versions[] = SL_SUPPORTED_VERSIONS;
    struct buf field = {0};
    if (string_member(conf.data, conf.len, "cniVersion", &field))
        for (size_t i = 0; i < sizeof versions / sizeof *versions; i++)
            if (!strcmp(field.data, versions[i]))
                config_version = versions[i];
    const char *socket_path = SL_DEFAULT_SOCKET;
    struct buf path = {0};
    if (string_member(conf.data, conf.len, "agentSocket", &path) && path.len && strlen(path.data) == path.len)
        socket_path = path.data;
    int unavailable = command && !strcmp(command, "STATUS") ? SL_PLUGIN_NOT_AVAILABLE : SL_TRY_AGAIN_LATER;

    struct buf req = {0};
    puts_buf(&req, "{\"op\": \"cni\", \"command\": ");
    put_json_string(&req, command ? command : "", command ? strlen(command) : 0);
    puts_buf(&req, ", \"env\": {");
    int first = 1;
    for (char **e = environ; *e; e++) {
        const char *eq = strchr(*e, '=');
        if (strncmp(*e, "CNI_", 4) || !eq || utf8_invalid_at(*e, strlen(*e)) >= 0)
            continue;
        puts_buf(&req, first ? "" : ", ");
        first = 0;
        put_json_string(&req, *e, (size_t)(eq - *e));
        puts_buf(&req, ": ");
        put_json_string(&req, eq + 1, strlen(eq + 1));
    }
    puts_buf(&req, "}, \"stdin\": ");
    put_json_string(&req, conf.data, conf.len);
    puts_buf(&req, "}\n");

    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(socket_path) >= sizeof addr.sun_path)
        return fail(unavailable, SL_UNREACHABLE, socket_path, strerror(ENAMETOOLONG));
    strcpy(addr.sun_path, socket_path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return fail(unavailable, SL_UNREACHABLE, socket_path, strerror(errno));
    /* A blocking connect: with the agent's listen backlog full (a burst of pod starts) it waits its turn. */
    while (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0)
        if (errno != EINTR)
            return fail(unavailable, SL_UNREACHABLE, socket_path, strerror(errno));
    for (size_t sent = 0; sent < req.len;) {
        ssize_t n = send(fd, req.data + sent, req.len - sent, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return fail(unavailable, SL_UNREACHABLE, socket_path, strerror(errno));
        }
        sent += (size_t)n;
    }

    struct buf reply = {0};
    put(&reply, "", 0);
    double deadline = now() + SL_CNI_TIMEOUT_S;
    while (!reply.len || reply.data[reply.len - 1] != '\n') {
        double left = deadline - now();
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        int ready = left > 0 ? poll(&pfd, 1, (int)(left * 1000) + 1) : 0;
        if (ready < 0 && errno == EINTR)
            continue;
        if (ready == 0)
            return fail(unavailable, SL_SILENT, socket_path, SL_CNI_TIMEOUT_S);
        got = ready < 0 ? -1 : recv(fd, chunk, sizeof chunk, 0);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            return fail(unavailable, SL_UNREACHABLE, socket_path, strerror(errno));
        }
        if (got == 0)
            break;
        put(&reply, chunk, (size_t)got);
    }
    close(fd);
    if (!reply.len)
        return fail(unavailable, SL_CLOSED, socket_path);

    const char *ok;
    size_t ok_len;
    struct buf output = {0};
    int has_ok = member(reply.data, reply.len, "ok", &ok, &ok_len);
    if (has_ok < 0)
        return fail(SL_IO_FAILURE, SL_UNREADABLE, socket_path, "not a JSON object");
    int success = has_ok && ok_len == 4 && !strncmp(ok, "true", 4);
    if (!has_ok)
        return fail(SL_IO_FAILURE, SL_UNREADABLE, socket_path, "no \"ok\"");
    /* "output" is what to print: none for a command without a result, the error result on failure */
    if (!string_member(reply.data, reply.len, "output", &output) && !success)
        return fail(SL_IO_FAILURE, SL_UNREADABLE, socket_path, "an error without \"output\"");
    if (output.len) {
        fwrite(output.data, 1, output.len, stdout);
        putchar('\n');
    }
    return success ? 0 : 1;
}
