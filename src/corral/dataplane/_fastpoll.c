/* The mesh's readiness set with its mechanical steps done in C (Linux, epoll).
 *
 * Why: on keep-alive traffic the mesh's work per request is two readiness events, each one
 * read and one send.  The kernel part of that is as cheap as HAProxy's; what Python added on
 * top (one event dispatch and a few method calls per event, ~3 us a request) was what kept
 * the userspace mesh below HAProxy.  So the step that repeats on every request is done here,
 * and so are the system calls of accepting a client and connecting upstream (one call from
 * Python each instead of five).  Every decision -- which backend, retries, ejection,
 * back-pressure, half-close, splice, errors, timeouts -- stays in Python
 * (corral.dataplane.proxy), and no byte is held here across calls.
 *
 * How: Poller is an epoll set, with select.epoll's register/modify/unregister, plus a "peer"
 * for a descriptor that Python has made plain forwarding: registered for reading only
 * (EPOLLIN | EPOLLRDHUP) with nothing pending towards its peer.  poll() takes a batch of
 * events; a readable event of such a descriptor without an error is handled here: one recv()
 * into our buffer and one send() of it to the peer, repeated until the EOF when the event
 * says the sender is done (RDHUP or HUP).  When that forwards everything and no read filled
 * the buffer, the event is done and Python never sees it.  Every other event is returned to
 * Python as (fd, events, got, rest):
 *
 *   got == NOT_READ (-1)  nothing was done: Python handles the event as it always did;
 *   got == READ_FAILED (-2)  recv() failed (a reset): Python closes the connection;
 *   got == 0              recv() read the FIN: Python passes the half-close on;
 *   got > 0               got bytes were read; rest is what the peer did not take (b"" if it
 *                         took everything, so got == the buffer's size: the sender is ahead,
 *                         time to splice), or None if the send failed (Python closes).
 *
 * Python keeps the peers right (set at register/modify, dropped by forget/unregister), so a
 * descriptor is forwarded here only in the state where Python's own code would do exactly
 * the same read and send.  Which descriptors had traffic is kept for the idle sweep
 * (take_busy).  The GIL is held throughout: every call is non-blocking.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24 /* Linux 4.2; older C headers lack the name */
#endif

#define NOT_READ (-1)
#define READ_FAILED (-2)
#define MAX_EVENTS 1024

typedef struct {
    PyObject_HEAD
    int epfd;                  /* -1 once closed */
    int *peer;                 /* peer[fd] + 1, or 0: fd is not forwarded here */
    uint8_t *busy;             /* busy[fd]: a read was forwarded since the last take_busy */
    Py_ssize_t size;           /* entries in peer and busy */
    char *buf;
    Py_ssize_t bufsize;
    struct epoll_event events[MAX_EVENTS];
} Poller;

/* A descriptor number from Python (3.11 has no public PyLong_AsInt). */
static int
as_fd(PyObject *obj, int *fd)
{
    long value = PyLong_AsLong(obj);
    if (value == -1 && PyErr_Occurred())
        return -1;
    if (value < INT_MIN || value > INT_MAX) {
        PyErr_SetString(PyExc_OverflowError, "file descriptor out of range");
        return -1;
    }
    *fd = (int)value;
    return 0;
}

static int
ensure_size(Poller *self, int fd)
{
    if (fd < self->size)
        return 0;
    Py_ssize_t size = self->size ? self->size : 1024;
    while (size <= fd)
        size *= 2;
    int *peer = PyMem_Realloc(self->peer, size * sizeof(int));
    if (peer == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->peer = peer;
    uint8_t *busy = PyMem_Realloc(self->busy, size);
    if (busy == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->busy = busy;
    memset(self->peer + self->size, 0, (size - self->size) * sizeof(int));
    memset(self->busy + self->size, 0, size - self->size);
    self->size = size;
    return 0;
}

static void
clear_entry(Poller *self, int fd)
{
    if (fd >= 0 && fd < self->size) {
        self->peer[fd] = 0;
        self->busy[fd] = 0;
    }
}

static int
check_open(Poller *self)
{
    if (self->epfd < 0) {
        PyErr_SetString(PyExc_ValueError, "I/O operation on closed poller");
        return -1;
    }
    return 0;
}

static PyObject *
Poller_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"bufsize", NULL};
    Py_ssize_t bufsize = 65536;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|n:Poller", kwlist, &bufsize))
        return NULL;
    if (bufsize <= 0) {
        PyErr_SetString(PyExc_ValueError, "bufsize must be positive");
        return NULL;
    }
    Poller *self = (Poller *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->epfd = -1;
    self->buf = PyMem_Malloc(bufsize);
    if (self->buf == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    self->bufsize = bufsize;
    self->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (self->epfd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static void
Poller_dealloc(Poller *self)
{
    if (self->epfd >= 0)
        close(self->epfd);
    PyMem_Free(self->peer);
    PyMem_Free(self->busy);
    PyMem_Free(self->buf);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* register(fd, events, peer=-1) / modify(fd, events, peer=-1) */
static PyObject *
control(Poller *self, PyObject *args, PyObject *kwds, int op)
{
    static char *kwlist[] = {"fd", "events", "peer", NULL};
    int fd, peer = -1;
    unsigned int events;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iI|i", kwlist, &fd, &events, &peer))
        return NULL;
    if (check_open(self) < 0)
        return NULL;
    if (fd < 0) {
        PyErr_SetString(PyExc_ValueError, "negative file descriptor");
        return NULL;
    }
    if (ensure_size(self, fd) < 0)
        return NULL;
    struct epoll_event ev = {.events = events, .data = {.fd = fd}};
    if (epoll_ctl(self->epfd, op, fd, &ev) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    /* Forwarding only ever for a descriptor watched for reading alone (see the top). */
    int plain = (events & EPOLLIN) && (events & ~(unsigned int)(EPOLLIN | EPOLLRDHUP)) == 0;
    self->peer[fd] = (plain && peer >= 0 && peer < INT_MAX) ? peer + 1 : 0;
    Py_RETURN_NONE;
}

static PyObject *
Poller_register(Poller *self, PyObject *args, PyObject *kwds)
{
    return control(self, args, kwds, EPOLL_CTL_ADD);
}

static PyObject *
Poller_modify(Poller *self, PyObject *args, PyObject *kwds)
{
    return control(self, args, kwds, EPOLL_CTL_MOD);
}

static PyObject *
Poller_unregister(Poller *self, PyObject *arg)
{
    int fd;
    if (as_fd(arg, &fd) < 0)
        return NULL;
    if (check_open(self) < 0)
        return NULL;
    clear_entry(self, fd);
    if (epoll_ctl(self->epfd, EPOLL_CTL_DEL, fd, NULL) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

/* forget(fd): fd is about to be closed (closing drops it from the set): no forwarding. */
static PyObject *
Poller_forget(Poller *self, PyObject *arg)
{
    int fd;
    if (as_fd(arg, &fd) < 0)
        return NULL;
    clear_entry(self, fd);
    Py_RETURN_NONE;
}

/* take_busy(fd, other): whether either forwarded a read since the last look; clears both. */
static PyObject *
Poller_take_busy(Poller *self, PyObject *const *args, Py_ssize_t nargs)
{
    int busy = 0;
    for (Py_ssize_t i = 0; i < nargs; i++) {
        int fd;
        if (as_fd(args[i], &fd) < 0)
            return NULL;
        if (fd >= 0 && fd < self->size) {
            busy |= self->busy[fd];
            self->busy[fd] = 0;
        }
    }
    return PyBool_FromLong(busy);
}

static int
append(PyObject *list, int fd, uint32_t events, Py_ssize_t got, PyObject *rest)
{
    PyObject *item = Py_BuildValue("(iInO)", fd, events, got, rest);
    if (item == NULL)
        return -1;
    int rc = PyList_Append(list, item);
    Py_DECREF(item);
    return rc;
}

/* Forward what fd has to peer, as Python's Connection._pump does: one read, or, when the
 * event says the sender is done (a FIN: RDHUP or HUP), reads until its EOF.  Whatever is left
 * for Python goes into out (see the top of this file). */
static int
forward(Poller *self, int fd, int peer, uint32_t ev, PyObject *out)
{
    int fin = (ev & (EPOLLRDHUP | EPOLLHUP)) != 0;
    for (;;) {
        ssize_t got = recv(fd, self->buf, (size_t)self->bufsize, 0);
        if (got < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
                return 0; /* a stale event: nothing there after all */
            return append(out, fd, ev, READ_FAILED, Py_None);
        }
        if (got == 0)
            return append(out, fd, ev, 0, Py_None);
        self->busy[fd] = 1;
        ssize_t sent = send(peer, self->buf, (size_t)got, MSG_NOSIGNAL);
        if (sent < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
                return append(out, fd, ev, got, Py_None);
            sent = 0;
        }
        if (sent < got || got == self->bufsize) {
            PyObject *rest = PyBytes_FromStringAndSize(self->buf + sent, got - sent);
            if (rest == NULL)
                return -1;
            int rc = append(out, fd, ev, got, rest);
            Py_DECREF(rest);
            return rc;
        }
        if (!fin)
            return 0; /* the common case: all forwarded, nothing more to do */
    }
}

/* forward(fd, peer): what poll() does for a plain read of fd, called directly (a connection
 * whose upstream just connected forwards the request at once): None when all was forwarded
 * (or nothing was there), else (got, rest) as in poll()'s entries. */
static PyObject *
Poller_forward(Poller *self, PyObject *const *args, Py_ssize_t nargs)
{
    int fd, peer;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "forward(fd, peer)");
        return NULL;
    }
    if (as_fd(args[0], &fd) < 0 || as_fd(args[1], &peer) < 0)
        return NULL;
    if (fd < 0 || ensure_size(self, fd) < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "negative file descriptor");
        return NULL;
    }
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    if (forward(self, fd, peer, EPOLLIN, out) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    PyObject *result = Py_None;
    if (PyList_GET_SIZE(out)) {
        PyObject *entry = PyList_GET_ITEM(out, 0); /* (fd, events, got, rest) */
        result = PyTuple_Pack(2, PyTuple_GET_ITEM(entry, 2), PyTuple_GET_ITEM(entry, 3));
        if (result == NULL) {
            Py_DECREF(out);
            return NULL;
        }
    } else {
        Py_INCREF(result);
    }
    Py_DECREF(out);
    return result;
}

/* poll(maxevents=256): take ready events without waiting; forward what is plain forwarding;
 * return the rest for Python (see the top of this file). */
static PyObject *
Poller_poll(Poller *self, PyObject *const *args, Py_ssize_t nargs)
{
    int maxevents = 256;
    if (nargs > 1) {
        PyErr_SetString(PyExc_TypeError, "poll() takes at most one argument");
        return NULL;
    }
    if (nargs == 1) {
        if (as_fd(args[0], &maxevents) < 0)
            return NULL;
    }
    if (maxevents <= 0 || maxevents > MAX_EVENTS)
        maxevents = MAX_EVENTS;
    if (check_open(self) < 0)
        return NULL;
    int n = epoll_wait(self->epfd, self->events, maxevents, 0);
    if (n < 0) {
        if (errno == EINTR)
            n = 0;
        else
            return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL; /* nothing was read yet: the events come again */
    for (int i = 0; i < n; i++) {
        int fd = self->events[i].data.fd;
        uint32_t ev = self->events[i].events;
        int peer = (fd < self->size) ? self->peer[fd] - 1 : -1;
        int plain = peer >= 0 && (ev & ~(uint32_t)(EPOLLRDHUP | EPOLLHUP)) == EPOLLIN;
        int rc = plain ? forward(self, fd, peer, ev, out)
                       : append(out, fd, ev, NOT_READ, Py_None);
        if (rc < 0) {
            /* Out of memory.  An untouched event comes again; but what a forwarding read took
             * may be lost, so that connection must not go on with a gap in its stream: cut it
             * (Python sees the error and closes).  The other events are still delivered. */
            PyErr_WriteUnraisable((PyObject *)self);
            if (plain) {
                shutdown(fd, SHUT_RDWR);
                shutdown(peer, SHUT_RDWR);
            }
        }
    }
    return out;
}

/* A peer address as Python's socket module gives it: (host, port) or, for IPv6,
 * (host, port, flowinfo, scope_id); None for another family. */
static PyObject *
peer_address(const struct sockaddr_storage *ss)
{
    char host[INET6_ADDRSTRLEN];
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
        if (inet_ntop(AF_INET, &a->sin_addr, host, sizeof host) == NULL)
            return PyErr_SetFromErrno(PyExc_OSError);
        return Py_BuildValue("(si)", host, ntohs(a->sin_port));
    }
    if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
        if (inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host) == NULL)
            return PyErr_SetFromErrno(PyExc_OSError);
        return Py_BuildValue("(siII)", host, ntohs(a->sin6_port), ntohl(a->sin6_flowinfo),
                             a->sin6_scope_id);
    }
    Py_RETURN_NONE;
}

/* accept(fd): (new descriptor, peer address) of the next connection on listening socket fd,
 * or None if there is none; the new socket is non-blocking, close-on-exec and TCP_NODELAY
 * (one call instead of Python's accept, setblocking and setsockopt). */
static PyObject *
Poller_accept(Poller *self, PyObject *arg)
{
    int lfd;
    if (as_fd(arg, &lfd) < 0)
        return NULL;
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    memset(&ss, 0, sizeof ss);
    int fd = accept4(lfd, (struct sockaddr *)&ss, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            Py_RETURN_NONE;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    int one = 1;
    /* A failure means the connection is gone already: its first read will say so. */
    (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    PyObject *peer = peer_address(&ss);
    PyObject *result = peer == NULL ? NULL : Py_BuildValue("(iN)", fd, peer);
    if (result == NULL)
        close(fd);
    return result;
}

/* An IP address literal and a port as a socket address (no name resolution, ever): 0, or -1
 * if host is not a literal (a name, a scoped IPv6 address); no exception is set. */
static int
ip_address(const char *host, int port, struct sockaddr_storage *ss, socklen_t *len)
{
    memset(ss, 0, sizeof *ss);
    struct sockaddr_in *a4 = (struct sockaddr_in *)ss;
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)ss;
    if (inet_pton(AF_INET, host, &a4->sin_addr) == 1) {
        a4->sin_family = AF_INET;
        a4->sin_port = htons((uint16_t)port);
        *len = sizeof *a4;
        return 0;
    }
    if (inet_pton(AF_INET6, host, &a6->sin6_addr) == 1) {
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons((uint16_t)port);
        *len = sizeof *a6;
        return 0;
    }
    return -1;
}

/* connect(fd, host, port, source): start connecting socket fd (non-blocking) to host:port,
 * from address source (None: the kernel's choice), as proxy.open_upstream does in Python:
 * TCP_NODELAY, the source address bound without a port (IP_BIND_ADDRESS_NO_PORT: connect()
 * picks one free for this destination), connect().  True if the handshake is done already
 * (to a local task it is), False if it is under way; OSError if it failed at once; None if
 * host or source is not an IP literal (nothing done: Python's own path resolves names). */
static PyObject *
Poller_connect(Poller *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "connect(fd, host, port, source)");
        return NULL;
    }
    int fd, port;
    if (as_fd(args[0], &fd) < 0 || as_fd(args[2], &port) < 0)
        return NULL;
    const char *host = PyUnicode_AsUTF8(args[1]);
    if (host == NULL)
        return NULL;
    if (port < 0 || port > 65535) {
        PyErr_SetString(PyExc_OverflowError, "port must be 0-65535");
        return NULL;
    }
    struct sockaddr_storage to, from;
    socklen_t tolen, fromlen = 0;
    if (ip_address(host, port, &to, &tolen) < 0)
        Py_RETURN_NONE;
    if (args[3] != Py_None) {
        const char *source = PyUnicode_AsUTF8(args[3]);
        if (source == NULL)
            return NULL;
        if (ip_address(source, 0, &from, &fromlen) < 0)
            Py_RETURN_NONE;
    }
    int one = 1;
    if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    if (fromlen) {
        (void)setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        if (bind(fd, (struct sockaddr *)&from, fromlen) < 0)
            return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (connect(fd, (struct sockaddr *)&to, tolen) == 0)
        Py_RETURN_TRUE;
    if (errno != EINPROGRESS)
        return PyErr_SetFromErrno(PyExc_OSError);
    /* Connected already?  Only then has it a peer (to a local task it has, by now). */
    struct sockaddr_storage peer;
    socklen_t peerlen = sizeof peer;
    return PyBool_FromLong(getpeername(fd, (struct sockaddr *)&peer, &peerlen) == 0);
}

static PyObject *
Poller_fileno(Poller *self, PyObject *Py_UNUSED(ignored))
{
    if (check_open(self) < 0)
        return NULL;
    return PyLong_FromLong(self->epfd);
}

static PyObject *
Poller_close(Poller *self, PyObject *Py_UNUSED(ignored))
{
    if (self->epfd >= 0) {
        close(self->epfd);
        self->epfd = -1;
    }
    Py_RETURN_NONE;
}

static PyObject *
Poller_get_closed(Poller *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->epfd < 0);
}

static PyMethodDef Poller_methods[] = {
    {"register", (PyCFunction)(void (*)(void))Poller_register, METH_VARARGS | METH_KEYWORDS,
     "register(fd, events, peer=-1): watch fd; peer >= 0: forward its plain reads to peer."},
    {"modify", (PyCFunction)(void (*)(void))Poller_modify, METH_VARARGS | METH_KEYWORDS,
     "modify(fd, events, peer=-1): change what fd is watched for, and its peer."},
    {"unregister", (PyCFunction)Poller_unregister, METH_O,
     "unregister(fd): stop watching fd, which stays open."},
    {"forget", (PyCFunction)Poller_forget, METH_O,
     "forget(fd): fd is about to be closed: stop forwarding it."},
    {"take_busy", (PyCFunction)(void (*)(void))Poller_take_busy, METH_FASTCALL,
     "take_busy(*fds): whether any of fds forwarded a read since the last look; clears them."},
    {"forward", (PyCFunction)(void (*)(void))Poller_forward, METH_FASTCALL,
     "forward(fd, peer): one plain read of fd sent to peer; None, or (got, rest) as poll()."},
    {"poll", (PyCFunction)(void (*)(void))Poller_poll, METH_FASTCALL,
     "poll(maxevents=256): forward plain reads; return [(fd, events, got, rest)] for the rest."},
    {"accept", (PyCFunction)Poller_accept, METH_O,
     "accept(fd): (descriptor, peer) of the next connection on fd (non-blocking, NODELAY), "
     "or None."},
    {"connect", (PyCFunction)(void (*)(void))Poller_connect, METH_FASTCALL,
     "connect(fd, host, port, source): start connecting fd; True if done already, "
     "None if an address is not an IP literal."},
    {"fileno", (PyCFunction)Poller_fileno, METH_NOARGS, "fileno(): the epoll descriptor."},
    {"close", (PyCFunction)Poller_close, METH_NOARGS, "close(): close the set (idempotent)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Poller_getset[] = {
    {"closed", (getter)Poller_get_closed, NULL, "whether the set is closed", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject PollerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "corral.dataplane._fastpoll.Poller",
    .tp_basicsize = sizeof(Poller),
    .tp_dealloc = (destructor)Poller_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "An epoll set that forwards plain reads of paired sockets itself.",
    .tp_methods = Poller_methods,
    .tp_getset = Poller_getset,
    .tp_new = Poller_new,
};

static struct PyModuleDef fastpoll_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "corral.dataplane._fastpoll",
    .m_doc = "The mesh's readiness set with its steady-state forwarding in C.",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__fastpoll(void)
{
    if (PyType_Ready(&PollerType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&fastpoll_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&PollerType);
    if (PyModule_AddObject(m, "Poller", (PyObject *)&PollerType) < 0) {
        Py_DECREF(&PollerType);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "NOT_READ", NOT_READ) < 0
        || PyModule_AddIntConstant(m, "READ_FAILED", READ_FAILED) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
