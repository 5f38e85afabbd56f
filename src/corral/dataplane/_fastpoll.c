/* The mesh's readiness set with its steady-state forwarding done in C (Linux, epoll).
 *
 * Why: on keep-alive traffic the mesh's work per request is two readiness events, each one
 * read and one send.  The kernel part of that is as cheap as HAProxy's; what Python added on
 * top (one event dispatch and a few method calls per event, ~3 us a request) was what kept
 * the userspace mesh below HAProxy.  So the one step that repeats on every request is done
 * here, and everything else -- accepting, connecting, balancing, back-pressure, half-close,
 * splice, errors, timeouts -- stays in Python (corral.dataplane.proxy).
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
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

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
    self->peer[fd] = peer >= 0 ? peer + 1 : 0;
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
        return NULL;
    for (int i = 0; i < n; i++) {
        int fd = self->events[i].data.fd;
        uint32_t ev = self->events[i].events;
        int peer = (fd < self->size) ? self->peer[fd] - 1 : -1;
        int rc;
        if (peer >= 0 && (ev & ~(uint32_t)(EPOLLRDHUP | EPOLLHUP)) == EPOLLIN)
            rc = forward(self, fd, peer, ev, out);
        else
            rc = append(out, fd, ev, NOT_READ, Py_None);
        if (rc < 0)
            goto error;
    }
    return out;
error:
    /* Only out of memory gets here (the loop logs it); a rest that could not be kept is
     * lost with it, as it would be in Python. */
    Py_DECREF(out);
    return NULL;
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
    {"poll", (PyCFunction)(void (*)(void))Poller_poll, METH_FASTCALL,
     "poll(maxevents=256): forward plain reads; return [(fd, events, got, rest)] for the rest."},
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
