/* The SSE decoder's common case, in C: optional, exact, and checked against the Python path.
 *
 * Theory of operation
 * -------------------
 * `SSEDecoder.feed()` (holysheep/_sse.py) calls `feed(decoder, data)` first. This function takes
 * a read only when every complete line in it is a `data:`, `event:` or blank line, ended by LF
 * or CRLF, no event gets a second data line, no bare CR is present and every size is clearly
 * within the decoder's limits: the shape of OpenAI and Anthropic chat streams. It then does
 * exactly what the Python line machine would do, on the decoder's own state (`_pending`,
 * `_pending_size`, `_data`, and the open event's `_fields`, `_event_type`, `_event_retry`),
 * and returns the events. For anything else it returns None *before changing any state*, and
 * the Python code handles the read: other fields, comments, bare CRs, BOMs, limits and their
 * errors live in one place only.
 *
 * Why this is the same as the Python path:
 * - a read with no LF only adds to `_pending`, like the Python path (which cuts at the last LF
 *   or CR; with no CR after the last LF, at the last LF). A read with a CR there goes to
 *   Python, which knows whether an LF follows in the next read;
 * - every value is decoded on its own with the "replace" handler. LF is ASCII and never inside
 *   a UTF-8 sequence, so decoding line by line gives the same text as decoding the block;
 * - no `id:` line is read here, so `_id_buffer` is the same for the whole read, and
 *   `last_event_id` can differ from it only if Python read an `id:` of the open event, which
 *   set `_fields`: then a blank line here commits it;
 * - sizes are checked in bytes, which are never fewer than characters: a line within the limit
 *   in bytes is within it in characters. One over it in bytes goes to Python, which decides.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

static PyObject *event_class; /* holysheep.ServerSentEvent, a NamedTuple */
static PyObject *str_message, *str_pending, *str_pending_size, *str_data, *str_fields,
    *str_id_buffer, *str_max_line_size, *str_max_event_size, *str_event_type, *str_event_retry,
    *str_last_event_id, *str_empty;

static int
get_size(PyObject *decoder, PyObject *name, Py_ssize_t *out)
{
    PyObject *value = PyObject_GetAttr(decoder, name);
    if (value == NULL)
        return -1;
    *out = PyLong_AsSsize_t(value);
    Py_DECREF(value);
    if (*out == -1 && PyErr_Occurred())
        return -1;
    return 0;
}

static int
set_size(PyObject *decoder, PyObject *name, Py_ssize_t size)
{
    PyObject *value = PyLong_FromSsize_t(size);
    if (value == NULL)
        return -1;
    int rc = PyObject_SetAttr(decoder, name, value);
    Py_DECREF(value);
    return rc;
}

/* Append `item` to `list`, handing over our reference; -1 on error, a NULL item included. */
static int
append_new(PyObject *list, PyObject *item)
{
    if (item == NULL)
        return -1;
    int rc = PyList_Append(list, item);
    Py_DECREF(item);
    return rc;
}

/* ServerSentEvent(type or "message", payload, id, retry), built like tuple.__new__(cls, items).
   `type` is the value of the event's `event:` field, or NULL when it had none. */
static PyObject *
new_event(PyObject *type, PyObject *payload, PyObject *id, PyObject *retry)
{
    if (type == NULL || PyUnicode_GET_LENGTH(type) == 0)
        type = str_message;
    PyObject *items = PyTuple_Pack(4, type, payload, id, retry);
    if (items == NULL)
        return NULL;
    PyObject *args = PyTuple_Pack(1, items);
    Py_DECREF(items);
    if (args == NULL)
        return NULL;
    PyObject *event = PyTuple_Type.tp_new((PyTypeObject *)event_class, args, NULL);
    Py_DECREF(args);
    return event;
}

/* The value of a field line of `length` bytes whose name and colon take `name` bytes: what
   follows the colon, less one leading space. */
static PyObject *
decode_value(const char *line, Py_ssize_t length, Py_ssize_t name)
{
    const char *value = line + name;
    Py_ssize_t size = length - name;
    if (size > 0 && *value == ' ') {
        value++;
        size--;
    }
    return PyUnicode_DecodeUTF8(value, size, "replace");
}

#define IS_FIELD(line, length, field) \
    ((length) >= (Py_ssize_t)sizeof(field) - 1 && memcmp((line), (field), sizeof(field) - 1) == 0)

/* The line starting at `pos` (the block ends with LF, so every line has an end): its length
   without its line end, LF or CRLF, and in `*next` where the next line starts. -1 if the line
   holds a CR anywhere else: a bare CR ends a line, which is the Python code's to handle. */
static Py_ssize_t
line_at(const char *block, Py_ssize_t pos, Py_ssize_t size, Py_ssize_t *next)
{
    const char *line = block + pos;
    const char *eol = memchr(line, '\n', (size_t)(size - pos));
    Py_ssize_t length = eol - line;
    *next = pos + length + 1;
    if (length > 0 && line[length - 1] == '\r')
        length--;
    if (memchr(line, '\r', (size_t)length) != NULL)
        return -1;
    return length;
}

/* Would the Python line machine see only `data:`, `event:` and blank lines, each event one
   data line, everything within the limits? `open` is whether an event already holds its data
   line. */
static int
takes_block(const char *block, Py_ssize_t size, int open, Py_ssize_t max_line,
            Py_ssize_t max_event)
{
    Py_ssize_t pos = 0, next;
    while (pos < size) {
        const char *line = block + pos;
        Py_ssize_t length = line_at(block, pos, size, &next);
        if (length == 0) {
            open = 0;
        }
        else if (length > max_line) {
            return 0;
        }
        else if (IS_FIELD(line, length, "data:")) {
            if (open || length - 5 > max_event)
                return 0; /* a second data line, or a long one */
            open = 1;
        }
        else if (!IS_FIELD(line, length, "event:")) {
            return 0; /* a bare CR (-1), a comment, another field */
        }
        pos = next;
    }
    return 1;
}

/* The event fields between lines, as the Python line machine keeps them (`_fields`,
   `_event_type`, `_event_retry`): read at the start of a block, written back at its end. */
typedef struct {
    int fields;       /* a line other than `data:` is part of the open event */
    PyObject *type;   /* its `event:` value, or NULL */
    PyObject *retry;  /* its valid `retry:` value (only ever set by Python), or None */
} Fields;

static int
fields_load(PyObject *decoder, Fields *f)
{
    PyObject *flag = PyObject_GetAttr(decoder, str_fields);
    if (flag == NULL)
        return -1;
    f->fields = PyObject_IsTrue(flag);
    Py_DECREF(flag);
    f->type = NULL;
    f->retry = Py_NewRef(Py_None);
    if (f->fields <= 0)
        return f->fields;
    f->type = PyObject_GetAttr(decoder, str_event_type);
    if (f->type == NULL)
        return -1;
    Py_SETREF(f->retry, PyObject_GetAttr(decoder, str_event_retry));
    return f->retry == NULL ? -1 : 0;
}

static void
fields_reset(Fields *f)
{
    f->fields = 0;
    Py_CLEAR(f->type);
    Py_SETREF(f->retry, Py_NewRef(Py_None));
}

static int
fields_store(PyObject *decoder, Fields *f)
{
    if (PyObject_SetAttr(decoder, str_fields, f->fields ? Py_True : Py_False) < 0 ||
        PyObject_SetAttr(decoder, str_event_type, f->type ? f->type : str_empty) < 0 ||
        PyObject_SetAttr(decoder, str_event_retry, f->retry) < 0)
        return -1;
    return 0;
}

static PyObject *
run_block(PyObject *decoder, const char *block, Py_ssize_t size, PyObject *data_lines)
{
    Fields f;
    if (fields_load(decoder, &f) < 0) {
        Py_XDECREF(f.type);
        Py_XDECREF(f.retry);
        return NULL;
    }
    int had_fields = f.fields, blank_lines = 0;
    PyObject *events = NULL, *id = PyObject_GetAttr(decoder, str_id_buffer);
    if (id == NULL)
        goto error;
    events = PyList_New(0);
    if (events == NULL)
        goto error;
    Py_ssize_t pos = 0, next, after;
    while (pos < size) {
        const char *line = block + pos;
        Py_ssize_t length = line_at(block, pos, size, &next);
        PyObject *payload;
        if (length == 0) { /* a blank line: dispatch what is open, if anything */
            pos = next;
            blank_lines = 1;
            if (PyList_GET_SIZE(data_lines) == 0) {
                fields_reset(&f); /* an event with no data is no event */
                continue;
            }
            payload = Py_NewRef(PyList_GET_ITEM(data_lines, 0));
            if (PyList_SetSlice(data_lines, 0, PY_SSIZE_T_MAX, NULL) < 0) {
                Py_DECREF(payload);
                goto error;
            }
        }
        else if (line[0] == 'e') { /* `event:`: takes_block let no other field through */
            Py_XSETREF(f.type, decode_value(line, length, 6));
            if (f.type == NULL)
                goto error;
            f.fields = 1;
            pos = next;
            continue;
        }
        else {
            PyObject *value = decode_value(line, length, 5);
            if (value == NULL)
                goto error;
            if (next < size && line_at(block, next, size, &after) == 0) {
                /* a data line and a blank line: the whole event at once (nothing is open,
                   or takes_block would have refused a second data line) */
                payload = value;
                pos = after;
                blank_lines = 1;
            }
            else { /* a data line whose event stays open */
                if (append_new(data_lines, value) < 0)
                    goto error;
                pos = next;
                continue;
            }
        }
        PyObject *event = new_event(f.type, payload, id, f.retry);
        Py_DECREF(payload);
        fields_reset(&f);
        if (append_new(events, event) < 0)
            goto error;
    }
    /* A blank line commits the last event ID; only a field Python read (`id:`) can have
       changed it since the last one. */
    if (blank_lines && had_fields && PyObject_SetAttr(decoder, str_last_event_id, id) < 0)
        goto error;
    if ((had_fields || f.fields) && fields_store(decoder, &f) < 0)
        goto error;
    Py_DECREF(id);
    Py_XDECREF(f.type);
    Py_DECREF(f.retry);
    return events;
error:
    Py_XDECREF(id);
    Py_XDECREF(f.type);
    Py_DECREF(f.retry);
    Py_XDECREF(events);
    return NULL;
}

static PyObject *
feed(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "feed(decoder, data) takes two arguments");
        return NULL;
    }
    PyObject *decoder = args[0], *data = args[1];
    if (event_class == NULL || !PyBytes_CheckExact(data))
        Py_RETURN_NONE;
    const char *bytes = PyBytes_AS_STRING(data);
    Py_ssize_t size = PyBytes_GET_SIZE(data);
    if (size == 0)
        Py_RETURN_NONE;

    PyObject *result = NULL, *pending = NULL, *data_lines = NULL, *joined = NULL;
    Py_ssize_t max_line, max_event;
    if (get_size(decoder, str_max_line_size, &max_line) < 0 ||
        get_size(decoder, str_max_event_size, &max_event) < 0)
        return NULL;
    pending = PyObject_GetAttr(decoder, str_pending);
    if (pending == NULL)
        goto done;
    data_lines = PyObject_GetAttr(decoder, str_data);
    if (data_lines == NULL)
        goto done;
    if (!PyList_CheckExact(pending) || !PyList_CheckExact(data_lines) ||
        PyList_GET_SIZE(data_lines) > 1)
        goto fallback;

    /* `_pending_size` is the size of `_pending`, kept by both paths: summing the pieces here
       would make a long line read one byte at a time quadratic. */
    Py_ssize_t held, pieces = PyList_GET_SIZE(pending);
    if (get_size(decoder, str_pending_size, &held) < 0)
        goto done;

    const char *last_lf = NULL;
    for (Py_ssize_t i = size - 1; i >= 0; i--) {
        if (bytes[i] == '\n') {
            last_lf = bytes + i;
            break;
        }
    }
    if (last_lf == NULL) { /* no line ends here: hold the bytes, like the Python path */
        if (held + size > max_line || memchr(bytes, '\r', (size_t)size) != NULL)
            goto fallback; /* over the limit, or a CR, which may end a line */
        if (PyList_Append(pending, data) < 0 ||
            set_size(decoder, str_pending_size, held + size) < 0)
            goto done;
        result = PyList_New(0);
        goto done;
    }
    Py_ssize_t end = last_lf - bytes + 1, rest = size - end;
    if (rest > max_line || memchr(last_lf + 1, '\r', (size_t)rest) != NULL)
        goto fallback; /* a CR after the last LF ends a line there, or may start a CRLF */

    const char *block = bytes;
    Py_ssize_t block_size = end;
    if (pieces > 0) {
        Py_ssize_t total = 0;
        for (Py_ssize_t i = 0; i < pieces; i++) {
            PyObject *piece = PyList_GET_ITEM(pending, i);
            if (!PyBytes_CheckExact(piece))
                goto fallback;
            total += PyBytes_GET_SIZE(piece);
        }
        if (total != held)
            goto fallback;
        joined = PyBytes_FromStringAndSize(NULL, held + end);
        if (joined == NULL)
            goto done;
        char *out = PyBytes_AS_STRING(joined);
        for (Py_ssize_t i = 0; i < pieces; i++) {
            PyObject *piece = PyList_GET_ITEM(pending, i);
            memcpy(out, PyBytes_AS_STRING(piece), (size_t)PyBytes_GET_SIZE(piece));
            out += PyBytes_GET_SIZE(piece);
        }
        memcpy(out, bytes, (size_t)end);
        block = PyBytes_AS_STRING(joined);
        block_size = held + end;
    }
    if (!takes_block(block, block_size, PyList_GET_SIZE(data_lines) > 0, max_line, max_event))
        goto fallback;

    /* From here on the read is ours: change the state. */
    result = run_block(decoder, block, block_size, data_lines);
    if (result == NULL)
        goto done;
    if (pieces > 0 && PyList_SetSlice(pending, 0, PY_SSIZE_T_MAX, NULL) < 0)
        goto error;
    if (rest > 0 && append_new(pending, PyBytes_FromStringAndSize(bytes + end, rest)) < 0)
        goto error;
    if ((pieces > 0 || rest > 0) && set_size(decoder, str_pending_size, rest) < 0)
        goto error;
    goto done;

error:
    Py_CLEAR(result);
    goto done;
fallback:
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(joined);
    Py_XDECREF(pending);
    Py_XDECREF(data_lines);
    return result;
}

static PyObject *
setup(PyObject *module, PyObject *cls)
{
    if (!PyType_Check(cls) || !PyType_IsSubtype((PyTypeObject *)cls, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "setup() takes the ServerSentEvent class");
        return NULL;
    }
    Py_XSETREF(event_class, Py_NewRef(cls));
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"feed", (PyCFunction)(void (*)(void))feed, METH_FASTCALL,
     "feed(decoder, data): the events of a plain read, or None to leave it to Python."},
    {"setup", setup, METH_O, "setup(ServerSentEvent): the class of the events built."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "holysheep._speedups",
    .m_doc = "The SSE decoder's common case in C; see the comment at the top of _speedups.c.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    struct {
        PyObject **slot;
        const char *text;
    } names[] = {
        {&str_message, "message"},
        {&str_pending, "_pending"},
        {&str_pending_size, "_pending_size"},
        {&str_data, "_data"},
        {&str_fields, "_fields"},
        {&str_id_buffer, "_id_buffer"},
        {&str_max_line_size, "max_line_size"},
        {&str_max_event_size, "max_event_size"},
        {&str_event_type, "_event_type"},
        {&str_event_retry, "_event_retry"},
        {&str_last_event_id, "last_event_id"},
        {&str_empty, ""},
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (*names[i].slot != NULL)
            continue;
        *names[i].slot = PyUnicode_InternFromString(names[i].text);
        if (*names[i].slot == NULL)
            return NULL;
    }
    return PyModule_Create(&module);
}
