/* transport._pollguard: polls at the idle priority, with a guard against starving.
 *
 * A SCHED_IDLE thread gives its CPU to any other task at once: a task woken on
 * its CPU preempts it, and the kernel places wake-ups on a CPU that runs only
 * SCHED_IDLE tasks as on an idle one (sched_idle_cpu()). That is what a polling
 * event loop wants while it polls (transport/spinloop.py). The danger is the
 * other side: while other tasks keep its CPU busy, a SCHED_IDLE thread gets
 * about 0.3% of it (measured here: gaps of 1.4 s next to one busy task), and a
 * poll that started on a free CPU would not end when its budget does.
 *
 * So a thread of this module watches the polls, without syscalls on the
 * poller's side: enter() notes the poll's deadline in memory shared with the
 * thread, and while polls happen the thread wakes every PERIOD_NS to look. It
 * never touches Python (a Python thread would need the GIL, which the starved
 * poller may hold) and puts a poller still at SCHED_IDLE past its deadline back
 * to SCHED_OTHER: a poll lasts at most its budget plus the caller's grace plus
 * one period, starved or not. With no poll for IDLE_PERIODS periods the thread
 * sleeps on an eventfd, which the next enter() writes: an idle process costs
 * it no wake-up. (A timerfd armed at each poll cost 3.8 us per arm or disarm
 * here, a VM exit each: 8 us per request on each side.)
 *
 * Guard(tid) makes the thread for the (native) thread id tid.
 *   enter(ns): the calling thread polls at SCHED_IDLE for at most ns.
 *   leave():   the calling thread back to SCHED_OTHER.
 *   rescued:   how many polls the guard thread ended.
 * Errors raise OSError; the caller (transport/pollguard.py) then polls as before.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <sys/types.h>
#include <unistd.h>

#define PERIOD_NS 2000000L  /* how often the thread looks while polls happen */
#define IDLE_PERIODS 25      /* periods without a poll before it sleeps */

typedef struct {
    int efd;                /* the thread sleeps on it while no poll happens */
    pid_t tid;              /* the poller */
    int64_t deadline;       /* CLOCK_MONOTONIC ns the current poll must end by; 0: none */
    uint64_t polls;         /* polls begun */
    int active;             /* the thread is awake, looking every PERIOD_NS */
    volatile unsigned long rescued;
} shared_t;

typedef struct {
    PyObject_HEAD
    shared_t *sh; /* shared with the guard thread, never freed (the thread outlives us) */
} GuardObject;

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static void *guard_main(void *arg) {
    shared_t *sh = (shared_t *)arg;
    struct sched_param p;
    struct timespec period = {0, PERIOD_NS};
    uint64_t last_polls = 0, count;
    int quiet = 0;
    memset(&p, 0, sizeof p);
    for (;;) {
        if (!__atomic_load_n(&sh->active, __ATOMIC_SEQ_CST)) {
            if (read(sh->efd, &count, sizeof count) < 0 && errno != EINTR && errno != EAGAIN)
                return NULL; /* the fd is gone: nothing left to guard */
            quiet = 0;
            continue;
        }
        nanosleep(&period, NULL);
        int64_t deadline = __atomic_load_n(&sh->deadline, __ATOMIC_SEQ_CST);
        if (deadline != 0 && now_ns() > deadline && sched_getscheduler(sh->tid) == SCHED_IDLE &&
            sched_setscheduler(sh->tid, SCHED_OTHER, &p) == 0)
            sh->rescued++;
        uint64_t polls = __atomic_load_n(&sh->polls, __ATOMIC_SEQ_CST);
        if (polls != last_polls || deadline != 0) {
            last_polls = polls;
            quiet = 0;
        } else if (++quiet >= IDLE_PERIODS) {
            /* go to sleep; a poll that began meanwhile keeps us awake (its enter()
             * saw active == 1 and wrote nothing, or saw 0 and wrote the eventfd) */
            __atomic_store_n(&sh->active, 0, __ATOMIC_SEQ_CST);
            if (__atomic_load_n(&sh->deadline, __ATOMIC_SEQ_CST) != 0 ||
                __atomic_load_n(&sh->polls, __ATOMIC_SEQ_CST) != last_polls)
                __atomic_store_n(&sh->active, 1, __ATOMIC_SEQ_CST);
            quiet = 0;
        }
    }
}

static int Guard_init(GuardObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"tid", NULL};
    int tid;
    pthread_t th;
    pthread_attr_t attr;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "i", kwlist, &tid))
        return -1;
    if (self->sh != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Guard is already initialised");
        return -1;
    }
    shared_t *sh = calloc(1, sizeof *sh);
    if (sh == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    sh->tid = (pid_t)tid;
    sh->efd = eventfd(0, EFD_CLOEXEC);
    if (sh->efd < 0) {
        free(sh);
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    int rc = pthread_create(&th, &attr, guard_main, sh);
    pthread_attr_destroy(&attr);
    if (rc != 0) {
        close(sh->efd);
        free(sh);
        errno = rc;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->sh = sh;
    return 0;
}

static PyObject *Guard_enter(GuardObject *self, PyObject *arg) {
    long long ns = PyLong_AsLongLong(arg);
    struct sched_param p;
    if (ns == -1 && PyErr_Occurred())
        return NULL;
    if (self->sh == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Guard is not initialised");
        return NULL;
    }
    shared_t *sh = self->sh;
    __atomic_store_n(&sh->deadline, now_ns() + (ns < 1 ? 1 : ns), __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&sh->polls, 1, __ATOMIC_SEQ_CST);
    if (__atomic_exchange_n(&sh->active, 1, __ATOMIC_SEQ_CST) == 0) {
        uint64_t one = 1;
        if (write(sh->efd, &one, sizeof one) < 0) {
            __atomic_store_n(&sh->deadline, 0, __ATOMIC_SEQ_CST);
            return PyErr_SetFromErrno(PyExc_OSError);
        }
    }
    memset(&p, 0, sizeof p);
    if (sched_setscheduler(0, SCHED_IDLE, &p) != 0) {
        __atomic_store_n(&sh->deadline, 0, __ATOMIC_SEQ_CST);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyObject *Guard_leave(GuardObject *self, PyObject *Py_UNUSED(ignored)) {
    struct sched_param p;
    memset(&p, 0, sizeof p);
    if (sched_setscheduler(0, SCHED_OTHER, &p) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    if (self->sh != NULL)
        __atomic_store_n(&self->sh->deadline, 0, __ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

static PyObject *Guard_get_rescued(GuardObject *self, void *Py_UNUSED(closure)) {
    return PyLong_FromUnsignedLong(self->sh != NULL ? self->sh->rescued : 0);
}

static PyMethodDef Guard_methods[] = {
    {"enter", (PyCFunction)Guard_enter, METH_O,
     "enter(ns): poll at SCHED_IDLE for at most ns nanoseconds."},
    {"leave", (PyCFunction)Guard_leave, METH_NOARGS, "leave(): back to SCHED_OTHER."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Guard_getset[] = {
    {"rescued", (getter)Guard_get_rescued, NULL, "polls the guard thread ended", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject GuardType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "transport._pollguard.Guard",
    .tp_doc = "A poll at SCHED_IDLE that a thread of its own ends when starved.",
    .tp_basicsize = sizeof(GuardObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Guard_init,
    .tp_methods = Guard_methods,
    .tp_getset = Guard_getset,
};

static struct PyModuleDef pollguard_module = {
    PyModuleDef_HEAD_INIT, "transport._pollguard",
    "Polls at the idle priority, with a guard against starving (see transport/pollguard.py).",
    -1, NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__pollguard(void) {
    if (PyType_Ready(&GuardType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&pollguard_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&GuardType);
    if (PyModule_AddObject(m, "Guard", (PyObject *)&GuardType) < 0) {
        Py_DECREF(&GuardType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
