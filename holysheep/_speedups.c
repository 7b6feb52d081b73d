/* The SSE decoder's common case, in C: optional, exact, and checked against the Python path.
 *
 * Theory of operation
 * -------------------
 * `SSEDecoder.feed()` (holysheep/_sse.py) calls `feed(decoder, data)` first. This function takes
 * a read only when every complete line in it is a `data:`, `event:` or blank line, ended by LF
 * or CRLF, no event gets a second data line, no event with an `event:` field is left open at
 * the end of the read, no bare CR is present and every size is clearly within the decoder's
 * limits: the shape of OpenAI and Anthropic chat streams. It then does exactly what the Python line machine
 * would do, on the decoder's own state (`_pending`, `_pending_size`, `_data`), and returns the
 * events. For anything else it returns None *before changing any state*, and the Python code
 * handles the read: fields, comments, CR line ends, BOMs, limits and their errors live in one
 * place only.
 *
 * Why this is the same as the Python path:
 * - a read with no LF only adds to `_pending`, like the Python path (which cuts at the last LF
 *   or CR; with no CR after the last LF, at the last LF). A read with a CR there goes to
 *   Python, which knows whether an LF follows in the next read;
 * - every value is decoded on its own with the "replace" handler. LF is ASCII and never inside
 *   a UTF-8 sequence, so decoding line by line gives the same text as decoding the block;
 * - while `_fields` is false, `last_event_id` equals `_id_buffer` (only an `id` field changes
 *   the buffer, and it sets `_fields`), so a dispatch here changes neither. An `event:` field
 *   is kept here only for events that end in this read, so `_fields` stays false;
 * - sizes are checked in bytes, which are never fewer than characters: a line within the limit
 *   in bytes is within it in characters. One over it in bytes goes to Python, which decides.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

static PyObject *event_class; /* holysheep.ServerSentEvent, a NamedTuple */
static PyObject *str_message, *str_pending, *str_pending_size, *str_data, *str_fields,
    *str_id_buffer, *str_max_line_size, *str_max_event_size;

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

/* ServerSentEvent(type or "message", payload, id, None), built like tuple.__new__(cls, items).
   `type` is the value of the event's `event:` field, or NULL when it had none. */
static PyObject *
new_event(PyObject *type, PyObject *payload, PyObject *id)
{
    if (type == NULL || PyUnicode_GET_LENGTH(type) == 0)
        type = str_message;
    PyObject *items = PyTuple_Pack(4, type, payload, id, Py_None);
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
   data line, everything within the limits, and no event with an `event:` field left open at
   the end (that state is the Python code's: `_fields`, `_event_type`)? `open` is whether an
   event already holds its data line. */
static int
takes_block(const char *block, Py_ssize_t size, int open, Py_ssize_t max_line,
            Py_ssize_t max_event)
{
    Py_ssize_t pos = 0, next;
    int typed = 0;
    while (pos < size) {
        const char *line = block + pos;
        Py_ssize_t length = line_at(block, pos, size, &next);
        if (length == 0) {
            open = typed = 0;
        }
        else if (length > max_line) {
            return 0;
        }
        else if (IS_FIELD(line, length, "data:")) {
            if (open || length - 5 > max_event)
                return 0; /* a second data line, or a long one */
            open = 1;
        }
        else if (IS_FIELD(line, length, "event:")) {
            typed = 1;
        }
        else {
            return 0; /* a bare CR (-1), a comment, another field */
        }
        pos = next;
    }
    return !typed;
}

static PyObject *
run_block(PyObject *decoder, const char *block, Py_ssize_t size, PyObject *data_lines)
{
    PyObject *id = PyObject_GetAttr(decoder, str_id_buffer);
    if (id == NULL)
        return NULL;
    PyObject *type = NULL; /* the `event:` value of the event being read */
    PyObject *events = PyList_New(0);
    if (events == NULL)
        goto error;
    Py_ssize_t pos = 0, next, after;
    while (pos < size) {
        const char *line = block + pos;
        Py_ssize_t length = line_at(block, pos, size, &next);
        PyObject *payload;
        if (length == 0) { /* a blank line: dispatch what is open, if anything */
            pos = next;
            if (PyList_GET_SIZE(data_lines) == 0) {
                Py_CLEAR(type); /* an event with no data is no event */
                continue;
            }
            payload = Py_NewRef(PyList_GET_ITEM(data_lines, 0));
            if (PyList_SetSlice(data_lines, 0, PY_SSIZE_T_MAX, NULL) < 0) {
                Py_DECREF(payload);
                goto error;
            }
        }
        else if (line[0] == 'e') { /* `event:`: takes_block let no other field through */
            Py_XSETREF(type, decode_value(line, length, 6));
            if (type == NULL)
                goto error;
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
            }
            else { /* a data line whose event stays open */
                if (append_new(data_lines, value) < 0)
                    goto error;
                pos = next;
                continue;
            }
        }
        PyObject *event = new_event(type, payload, id);
        Py_DECREF(payload);
        Py_CLEAR(type);
        if (append_new(events, event) < 0)
            goto error;
    }
    Py_DECREF(id);
    return events;
error:
    Py_DECREF(id);
    Py_XDECREF(type);
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
    PyObject *fields = PyObject_GetAttr(decoder, str_fields);
    if (fields == NULL)
        return NULL;
    int has_fields = PyObject_IsTrue(fields);
    Py_DECREF(fields);
    if (has_fields != 0)
        return has_fields < 0 ? NULL : Py_NewRef(Py_None);

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
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (*names[i].slot == NULL && (*names[i].slot = PyUnicode_InternFromString(names[i].text)) == NULL)
            return NULL;
    }
    return PyModule_Create(&module);
}
