/* The express lane's two scans in C: serving/express.py's `scan_request` and `read_answer`.

   The same rules as the Python versions beside them in serving/express.py, which stay as the
   fallback where no compiler built this module (BERTH_NO_EXTENSIONS=1 forces them);
   tests/test_express.py holds the two to the same results over a corpus of heads and their
   mutations. Why C: the lane's Python came down to two regular-expression scans and the loops
   over their matches, a fifth of berth boot's CPU per request (docs/benchmarks.md). Neither
   scan decides alone what reaches the app: llhttp still checks every whole request and answer
   the lane passes. Only bytes come in, only bytes, ints and tuples go out; every read is
   bounded by the buffer's length. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

static unsigned char lower(unsigned char c) { return (c >= 'A' && c <= 'Z') ? (unsigned char)(c + 32) : c; }

/* The `n` bytes at `p` equal the lower-case `s`, ASCII case folded. */
static int folded_equal(const unsigned char *p, const char *s, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++)
        if (lower(p[i]) != (unsigned char)s[i])
            return 0;
    return 1;
}

/* At `p` (within `end`) the header name `s` (lower case), then ':'. */
static int name_is(const unsigned char *p, const unsigned char *end, const char *s, Py_ssize_t n) {
    return end - p > n && p[n] == ':' && folded_equal(p, s, n);
}

/* The value from `p` to `end` is `s` (lower case), ASCII case folded. */
static int value_is(const unsigned char *p, const unsigned char *end, const char *s) {
    Py_ssize_t n = (Py_ssize_t)strlen(s);
    return end - p == n && folded_equal(p, s, n);
}

enum { NONE, HOST, CONTENT_LENGTH, AUTHORIZATION, X_FORWARDED_FOR, X_FORWARDED_PROTO, X_FORWARDED_HOST, CONNECTION, KEEP_ALIVE, OTHER };

/* A noted header line: its name (just after a "\n"), its colon, its value (blanks around it
   cut, as the patterns and rstrip do) and the '\r' that ends it. */
struct noted {
    const unsigned char *name, *colon, *value, *value_end, *cr;
};

/* A noted header line as the Python patterns find one: at `p` (just after a "\n") a noted name
   and ':', blanks, then a value up to the next '\r'. Returns its kind (NONE: no match) and fills
   `line`. `response`: the answer's names, else the request's. */
static int noted_line(const unsigned char *p, const unsigned char *end, int response, struct noted *line) {
    int kind = NONE;
    const unsigned char *c = NULL;
#define TRY(literal, k) if (kind == NONE && name_is(p, end, literal, sizeof(literal) - 1)) { kind = k; c = p + sizeof(literal) - 1; }
    if (!response) {
        TRY("host", HOST) TRY("authorization", AUTHORIZATION) TRY("x-forwarded-for", X_FORWARDED_FOR)
        TRY("x-forwarded-proto", X_FORWARDED_PROTO) TRY("x-forwarded-host", X_FORWARDED_HOST) TRY("expect", OTHER)
    }
    TRY("content-length", CONTENT_LENGTH) TRY("connection", CONNECTION) TRY("keep-alive", KEEP_ALIVE)
    TRY("te", OTHER) TRY("trailer", OTHER) TRY("trailers", OTHER) TRY("transfer-encoding", OTHER) TRY("upgrade", OTHER)
#undef TRY
    if (kind == NONE && end - p > 6 && folded_equal(p, "proxy-", 6)) {
        c = memchr(p + 6, ':', (size_t)(end - p - 6)); /* "proxy-[^:]*:", as the pattern: to the first ':' */
        if (c != NULL)
            kind = OTHER;
    }
    if (kind == NONE)
        return NONE;
    const unsigned char *v = c + 1;
    while (v < end && (*v == ' ' || *v == '\t'))
        v++;
    const unsigned char *r = memchr(v, '\r', (size_t)(end - v));
    if (r == NULL)
        return NONE;
    const unsigned char *ve = r;
    while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t'))
        ve--;
    line->name = p, line->colon = c, line->value = v, line->value_end = ve, line->cr = r;
    return kind;
}

/* The next noted line after `*at` within `end`, trying a match after each "\n" in turn as
   `findall` does, and `*at` moved past it; NONE: no more. */
static int next_noted(const unsigned char **at, const unsigned char *end, int response, struct noted *line) {
    for (;;) {
        const unsigned char *newline = memchr(*at, '\n', (size_t)(end - *at));
        if (newline == NULL)
            return NONE;
        int kind = noted_line(newline + 1, end, response, line);
        if (kind != NONE) {
            *at = line->cr + 1;
            return kind;
        }
        *at = newline + 1;
    }
}

/* ASCII digits only (bytes.isdigit), at least one; -1: not, or too many to be a body here. */
static long long digits(const unsigned char *p, const unsigned char *end) {
    if (p == end || end - p > 18)
        return -1;
    long long n = 0;
    for (; p < end; p++) {
        if (*p < '0' || *p > '9')
            return -1;
        n = n * 10 + (*p - '0');
    }
    return n;
}

static PyObject *bytes_of(const unsigned char *p, const unsigned char *end) {
    return PyBytes_FromStringAndSize((const char *)p, end - p);
}

static PyObject *lowered(const unsigned char *p, const unsigned char *end) {
    PyObject *out = PyBytes_FromStringAndSize(NULL, end - p);
    if (out != NULL) {
        unsigned char *o = (unsigned char *)PyBytes_AS_STRING(out);
        for (; p < end; p++)
            *o++ = lower(*p);
    }
    return out;
}

static const char *METHODS[] = {"GET", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"};

/* RFC 3986's characters, which llhttp's strict mode always accepts in a target. */
static int target_char(unsigned char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || (c != 0 && strchr("-._~!$&'()*+,;=:@/?%", c) != NULL);
}

PyDoc_STRVAR(scan_request_doc,
"scan_request(data, max_url, max_header_size) -> (method, target, block, body, content_length, host, authorization, noted) | None\n\n"
"serving/express.py's scan_request, in C.");

static PyObject *scan_request(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "scan_request(data: bytes, max_url: int, max_header_size: int)");
        return NULL;
    }
    Py_ssize_t max_url = PyLong_AsSsize_t(args[1]), max_header_size = PyLong_AsSsize_t(args[2]);
    if ((max_url == -1 || max_header_size == -1) && PyErr_Occurred())
        return NULL;
    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t size = PyBytes_GET_SIZE(args[0]);
    const unsigned char *end = data + size, *p = data;

    /* The request line: a method, a target of RFC 3986's characters, HTTP/1.1. */
    Py_ssize_t method_length = 0;
    for (size_t i = 0; i < sizeof(METHODS) / sizeof(METHODS[0]); i++) {
        Py_ssize_t n = (Py_ssize_t)strlen(METHODS[i]);
        if (size > n && memcmp(data, METHODS[i], (size_t)n) == 0 && data[n] == ' ') {
            method_length = n;
            break;
        }
    }
    if (method_length == 0)
        Py_RETURN_NONE;
    const unsigned char *target = data + method_length + 1;
    if (target >= end || *target != '/')
        Py_RETURN_NONE;
    p = target + 1;
    while (p < end && target_char(*p))
        p++;
    const unsigned char *target_end = p;
    if (end - p < 11 || memcmp(p, " HTTP/1.1\r\n", 11) != 0)
        Py_RETURN_NONE;
    Py_ssize_t start = (p + 11) - data; /* the first header line */
    const unsigned char *blank = memmem(data + start - 2, (size_t)(size - start + 2), "\r\n\r\n", 4);
    if (blank == NULL || target_end - target > max_url || (blank - data) - start > max_header_size)
        Py_RETURN_NONE; /* the chain answers 414 and 431 */
    const unsigned char *block = data + start - 1, *block_end = blank + 2; /* "\n" + the header lines */
    const unsigned char *body = blank + 4;

    /* The noted lines, as REQUEST_NOTED.findall and begin's loop take them. */
    const unsigned char *host = NULL, *host_end = NULL, *authorization = NULL, *authorization_end = NULL;
    long long length = -1;
    int seen = 0; /* the forwarding names found, a bit each */
    PyObject *noted = PyList_New(0);
    if (noted == NULL)
        return NULL;
    const unsigned char *at = block;
    struct noted line;
    int kind;
    while ((kind = next_noted(&at, block_end, 0, &line)) != NONE) {
        if (kind == HOST) {
            if (host != NULL)
                goto decline; /* two: the chain refuses them */
            host = line.value, host_end = line.value_end;
            continue;
        }
        if (kind == CONNECTION || kind == KEEP_ALIVE || kind == OTHER || (seen & (1 << kind)))
            goto decline; /* hop-by-hop, Expect, Upgrade or a repeated one: the chain's */
        seen |= 1 << kind;
        if (kind == CONTENT_LENGTH) {
            length = digits(line.value, line.value_end);
            if (length < 0)
                goto decline;
        } else if (kind == AUTHORIZATION) {
            authorization = line.value, authorization_end = line.value_end;
        }
        PyObject *whole = bytes_of(line.name, line.cr + 1), *lower_name = lowered(line.name, line.colon),
                 *value = bytes_of(line.value, line.value_end);
        PyObject *entry = (whole && lower_name && value) ? PyTuple_Pack(3, whole, lower_name, value) : NULL;
        Py_XDECREF(whole), Py_XDECREF(lower_name), Py_XDECREF(value);
        if (entry == NULL || PyList_Append(noted, entry) < 0) {
            Py_XDECREF(entry);
            Py_DECREF(noted);
            return NULL;
        }
        Py_DECREF(entry);
    }
    if (host == NULL || end - body != (length < 0 ? 0 : length))
        goto decline; /* no Host (400), or a body not all here, or a pipelined request after it */

    PyObject *length_object = length < 0 ? Py_NewRef(Py_None) : PyLong_FromLongLong(length);
    PyObject *authorization_object = authorization == NULL ? Py_NewRef(Py_None) : bytes_of(authorization, authorization_end);
    return Py_BuildValue("(NNNNNNNN)", bytes_of(data, data + method_length), bytes_of(target, target_end),
                         bytes_of(block, block_end), bytes_of(body, end), length_object, bytes_of(host, host_end),
                         authorization_object, noted);

decline:
    Py_DECREF(noted);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(read_answer_doc,
"read_answer(data) -> (status, body_start, content_length, head, keep_alive) | 0 (more to come) | 1 (the chain's)\n\n"
"serving/express.py's read_answer, in C.");

static PyObject *read_answer(PyObject *Py_UNUSED(module), PyObject *data_object) {
    if (!PyBytes_Check(data_object)) {
        PyErr_SetString(PyExc_TypeError, "read_answer(data: bytes)");
        return NULL;
    }
    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(data_object);
    Py_ssize_t size = PyBytes_GET_SIZE(data_object);
    const unsigned char *end = data + size;

    /* STATUS_LINE: HTTP/1.1, a status 200-599, a reason of visible characters, blanks and tabs. */
    const unsigned char *line_end = NULL, *reason = data + 13;
    if (size >= 13 && memcmp(data, "HTTP/1.1 ", 9) == 0 && data[9] >= '2' && data[9] <= '5' && data[10] >= '0' && data[10] <= '9'
        && data[11] >= '0' && data[11] <= '9' && data[12] == ' ') {
        const unsigned char *p = reason;
        while (p < end && (*p == '\t' || (*p >= ' ' && *p <= '~')))
            p++;
        if (end - p >= 2 && p[0] == '\r' && p[1] == '\n')
            line_end = p + 2;
    }
    const unsigned char *blank = size >= 4 ? memmem(data, (size_t)size, "\r\n\r\n", 4) : NULL;
    if (line_end == NULL || blank == NULL) {
        Py_ssize_t prefix = size < 9 ? size : 9;
        if (blank != NULL || size > 8192 || (line_end == NULL && memcmp(data, "HTTP/1.1 ", (size_t)prefix) != 0))
            return PyLong_FromLong(1); /* a head the chain's parser reads (or refuses) */
        return PyLong_FromLong(0);     /* the head is still coming */
    }
    if (line_end - reason == 2)
        return PyLong_FromLong(1); /* no reason phrase: the chain writes the standard one */
    int status = (data[9] - '0') * 100 + (data[10] - '0') * 10 + (data[11] - '0');
    if (status == 204 || status == 304 || status == 503)
        return PyLong_FromLong(1); /* bodiless by status, or a refusal a gateway retries elsewhere */

    /* The noted lines, as RESPONSE_NOTED.findall and read_answer's loop take them; the head is
       copied less the lines cut (Content-Length, Connection, Keep-Alive), then the length. */
    const unsigned char *head = line_end - 1, *head_end = blank + 2; /* "\n" + the header lines */
    long long length = -1;
    int keep_alive = 1;
    char small[4096];
    char *out = (head_end - data) + 40 <= (Py_ssize_t)sizeof(small) ? small : PyMem_Malloc((size_t)((head_end - data) + 40));
    if (out == NULL)
        return PyErr_NoMemory();
    PyObject *result = NULL;
    Py_ssize_t written = (line_end - 1) - data; /* the status line, less its "\n" (the head begins with it) */
    memcpy(out, data, (size_t)written);
    const unsigned char *copied = head, *at = head;
    struct noted line;
    int kind;
    while ((kind = next_noted(&at, head_end, 1, &line)) != NONE) {
        int taken; /* a line the lane reads and cuts: one Content-Length of digits, Connection: keep-alive or close, Keep-Alive */
        if (kind == CONTENT_LENGTH)
            taken = length < 0 && (length = digits(line.value, line.value_end)) >= 0;
        else if (kind == CONNECTION)
            taken = (keep_alive = value_is(line.value, line.value_end, "keep-alive")) || value_is(line.value, line.value_end, "close");
        else
            taken = kind == KEEP_ALIVE;
        if (!taken) {
            result = PyLong_FromLong(1); /* framing or hop-by-hop headers the chain handles */
            goto done;
        }
        /* Cut the line ("\n" + it + "\n" becomes "\n"), when a "\n" ends it, as bytes.replace does. */
        if (at < head_end && *at == '\n') {
            memcpy(out + written, copied, (size_t)(line.name - copied));
            written += line.name - copied;
            copied = at + 1;
        }
    }
    if (length < 0 || length > 64 * 1024) {
        result = PyLong_FromLong(1); /* streamed, unsized or large: the chain's */
        goto done;
    }
    memcpy(out + written, copied, (size_t)(head_end - copied));
    written += head_end - copied;
    written += sprintf(out + written, "Content-Length: %lld\r\n", length);
    result = Py_BuildValue("(inLNO)", status, (Py_ssize_t)(blank + 4 - data), length,
                           PyBytes_FromStringAndSize(out, written), keep_alive ? Py_True : Py_False);
done:
    if (out != small)
        PyMem_Free(out);
    return result;
}

static PyMethodDef methods[] = {
    {"scan_request", (PyCFunction)(void (*)(void))scan_request, METH_FASTCALL, scan_request_doc},
    {"read_answer", (PyCFunction)read_answer, METH_O, read_answer_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "serving._express",
    .m_doc = "The express lane's scans in C.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__express(void) { return PyModule_Create(&module); }
