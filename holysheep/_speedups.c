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
 * - a line is measured in bytes, as Python measures it; an event's data in bytes, which are
 *   never fewer than its characters (what Python counts). A line over its limit, or a data
 *   line that may be over the event's, goes to Python, which decides.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>
#include <structmember.h>

#ifndef Py_ALWAYS_INLINE /* Python.h has it from 3.11 */
#if defined(__GNUC__) || defined(__clang__)
#define Py_ALWAYS_INLINE __attribute__((always_inline))
#elif defined(_MSC_VER)
#define Py_ALWAYS_INLINE __forceinline
#else
#define Py_ALWAYS_INLINE
#endif
#endif

static PyObject *event_class; /* holysheep.ServerSentEvent, a NamedTuple */
static PyObject *str_message, *str_empty;

#define SLOT(obj, offset) (*(PyObject **)((char *)(obj) + (offset)))

/* Replace the object in a slot (which may be empty) with a new reference to `value`. */
static void
slot_set(PyObject *obj, Py_ssize_t offset, PyObject *value)
{
    PyObject *old = SLOT(obj, offset);
    SLOT(obj, offset) = Py_NewRef(value);
    Py_XDECREF(old);
}

/* The decoder's attributes read and written here, by name, and (for an `SSEDecoder` itself)
   by the offset of its slot, which `setup_chat()` finds. */
enum {
    D_PENDING,
    D_PENDING_SIZE,
    D_DATA,
    D_FIELDS,
    D_ID_BUFFER,
    D_MAX_LINE_SIZE,
    D_MAX_EVENT_SIZE,
    D_EVENT_TYPE,
    D_EVENT_RETRY,
    D_LAST_EVENT_ID,
    D_SPECIAL,
    D_AT_START,
    D_SKIP_LF,
    D_CLOSED,
    D_FAILED,
    D_COUNT
};
static const char *const decoder_attr_text[D_COUNT] = {
    "_pending",   "_pending_size", "_data",       "_fields",       "_id_buffer",    "max_line_size",
    "max_event_size", "_event_type", "_event_retry", "last_event_id", "_special",  "_at_start",
    "_skip_lf",       "closed",      "_failed",
};
static PyObject *decoder_attr[D_COUNT]; /* the names, interned */
static Py_ssize_t decoder_slot[D_COUNT];
static PyTypeObject *decoder_class; /* SSEDecoder, once setup_chat() has found its slots */
static int chat_ready;               /* setup_chat() succeeded */

/* Whether `decoder` is an `SSEDecoder` itself, whose slots `decoder_slot` locates. A subclass
   may shadow a slot with a property: it is read by name. */
static inline int
plain_decoder(PyObject *decoder)
{
    return chat_ready && Py_TYPE(decoder) == decoder_class;
}

/* A new reference to the decoder's attribute `field`. A plain decoder's is read from its slot:
   the attribute lookup that skips cost some 160 instructions, nine times a read, a third of
   the decoder's work for a chat event. A slot never set goes to getattr, for its error. */
static PyObject *
decoder_get(PyObject *decoder, int field)
{
    if (plain_decoder(decoder)) {
        PyObject *value = SLOT(decoder, decoder_slot[field]);
        if (value != NULL)
            return Py_NewRef(value);
    }
    return PyObject_GetAttr(decoder, decoder_attr[field]);
}

/* Set the decoder's attribute `field` to `value` (not stolen), as `decoder_get` reads it. */
static int
decoder_set(PyObject *decoder, int field, PyObject *value)
{
    if (plain_decoder(decoder)) {
        slot_set(decoder, decoder_slot[field], value);
        return 0;
    }
    return PyObject_SetAttr(decoder, decoder_attr[field], value);
}

static int
get_size(PyObject *decoder, int field, Py_ssize_t *out)
{
    PyObject *value = decoder_get(decoder, field);
    if (value == NULL)
        return -1;
    *out = PyLong_AsSsize_t(value);
    Py_DECREF(value);
    if (*out == -1 && PyErr_Occurred())
        return -1;
    return 0;
}

/* A limit (`max_line_size`, `max_event_size`): 1 with it in `*out`; 0 if it is not an int
   from 1 to PY_SSIZE_T_MAX, which `SSEDecoder.__init__` refuses but a caller may set later,
   for the Python code to compare as it is; -1 with an error set if it cannot be read. */
static int
get_limit(PyObject *decoder, int field, Py_ssize_t *out)
{
    PyObject *value = decoder_get(decoder, field);
    if (value == NULL)
        return -1;
    int overflow = 0;
    long long size = PyLong_Check(value) && !PyBool_Check(value)
                         ? PyLong_AsLongLongAndOverflow(value, &overflow)
                         : 0;
    Py_DECREF(value);
    if (size == -1 && PyErr_Occurred())
        return -1;
    if (overflow || size < 1 || size > PY_SSIZE_T_MAX)
        return 0;
    *out = (Py_ssize_t)size;
    return 1;
}

static int
set_size(PyObject *decoder, int field, Py_ssize_t size)
{
    PyObject *value = PyLong_FromSsize_t(size);
    if (value == NULL)
        return -1;
    int rc = decoder_set(decoder, field, value);
    Py_DECREF(value);
    return rc;
}

/* The last LF of `bytes`, or NULL. A read of a long line holds none, so this scans all of it:
   glibc's memrchr does that a vector at a time; a byte loop ran at a speed that swung by a
   third with where the compiler happened to place it (64 KiB events, 16 KiB reads). */
static const char *
find_last_lf(const char *bytes, Py_ssize_t size)
{
#ifdef __GLIBC__
    return memrchr(bytes, '\n', (size_t)size); /* declared: pyconfig.h sets _GNU_SOURCE */
#else
    for (Py_ssize_t i = size - 1; i >= 0; i--)
        if (bytes[i] == '\n')
            return bytes + i;
    return NULL;
#endif
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

/* An object the garbage collector need never look at: one that holds only strings, numbers,
   None and other such objects, and cannot be changed (CPython leaves exact tuples and dicts
   of that kind untracked too). Chunks and events are made for every token, and while a
   caller holds one, collections move it to the oldest generation: with thousands of open
   streams, untracked values make each full collection shorter and start fewer of them. */
static PyObject *
untracked(PyObject *value)
{
    if (value != NULL)
        PyObject_GC_UnTrack(value);
    return value;
}

/* ServerSentEvent(type or "message", payload, id, retry), built like tuple.__new__(cls, items).
   `type` is the value of the event's `event:` field, or NULL when it had none. Untracked: its
   four items are strings, None or an int. */
static PyObject *
new_event(PyObject *type, PyObject *payload, PyObject *id, PyObject *retry)
{
    if (type == NULL || PyUnicode_GET_LENGTH(type) == 0)
        type = str_message;
#if PY_VERSION_HEX < 0x030E0000
    /* What tuple.__new__ does for a subclass (`tuple_subtype_new`) less the two tuples it
       takes and makes on the way, which cost a quarter of the decoder's instructions. The
       class's tp_alloc, PyType_GenericAlloc, zeroes and GC-tracks the event. From 3.14 a
       tuple caches its hash, which that function marks unknown and zeroed memory would
       not: there, the long way. */
    PyObject *event = ((PyTypeObject *)event_class)->tp_alloc((PyTypeObject *)event_class, 4);
    if (event == NULL)
        return NULL;
    PyTuple_SET_ITEM(event, 0, Py_NewRef(type));
    PyTuple_SET_ITEM(event, 1, Py_NewRef(payload));
    PyTuple_SET_ITEM(event, 2, Py_NewRef(id));
    PyTuple_SET_ITEM(event, 3, Py_NewRef(retry));
    return untracked(event);
#else
    PyObject *items = PyTuple_Pack(4, type, payload, id, retry);
    if (items == NULL)
        return NULL;
    PyObject *args = PyTuple_Pack(1, items);
    Py_DECREF(items);
    if (args == NULL)
        return NULL;
    PyObject *event = PyTuple_Type.tp_new((PyTypeObject *)event_class, args, NULL);
    Py_DECREF(args);
    return untracked(event);
#endif
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
    f->type = NULL;
    f->retry = NULL; /* for the caller's cleanup, if `_fields` cannot be read */
    PyObject *flag = decoder_get(decoder, D_FIELDS);
    if (flag == NULL)
        return -1;
    f->fields = PyObject_IsTrue(flag);
    Py_DECREF(flag);
    f->retry = Py_NewRef(Py_None);
    if (f->fields <= 0)
        return f->fields;
    f->type = decoder_get(decoder, D_EVENT_TYPE);
    if (f->type == NULL)
        return -1;
    Py_SETREF(f->retry, decoder_get(decoder, D_EVENT_RETRY));
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
    if (decoder_set(decoder, D_FIELDS, f->fields ? Py_True : Py_False) < 0 ||
        decoder_set(decoder, D_EVENT_TYPE, f->type ? f->type : str_empty) < 0 ||
        decoder_set(decoder, D_EVENT_RETRY, f->retry) < 0)
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
    PyObject *events = NULL, *id = decoder_get(decoder, D_ID_BUFFER);
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
    if (blank_lines && had_fields && decoder_set(decoder, D_LAST_EVENT_ID, id) < 0)
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
    int limits = get_limit(decoder, D_MAX_LINE_SIZE, &max_line);
    if (limits > 0)
        limits = get_limit(decoder, D_MAX_EVENT_SIZE, &max_event);
    if (limits <= 0) /* an error, or a limit set to what `__init__` refuses: Python's */
        return limits < 0 ? NULL : Py_NewRef(Py_None);
    pending = decoder_get(decoder, D_PENDING);
    if (pending == NULL)
        goto done;
    data_lines = decoder_get(decoder, D_DATA);
    if (data_lines == NULL)
        goto done;
    if (!PyList_CheckExact(pending) || !PyList_CheckExact(data_lines) ||
        PyList_GET_SIZE(data_lines) > 1)
        goto fallback;
    /* An event left open by an earlier read holds one data line, which Python measures only
       when it dispatches the event: one over max_event_size is Python's to refuse. */
    if (PyList_GET_SIZE(data_lines) == 1) {
        PyObject *open = PyList_GET_ITEM(data_lines, 0);
        if (!PyUnicode_CheckExact(open) || PyUnicode_GET_LENGTH(open) > max_event)
            goto fallback;
    }

    /* `_pending_size` is the size of `_pending`, kept by both paths: summing the pieces here
       would make a long line read one byte at a time quadratic. */
    Py_ssize_t held, pieces = PyList_GET_SIZE(pending);
    if (get_size(decoder, D_PENDING_SIZE, &held) < 0)
        goto done;

    const char *last_lf = find_last_lf(bytes, size);
    if (last_lf == NULL) { /* no line ends here: hold the bytes, like the Python path */
        if (held + size > max_line || memchr(bytes, '\r', (size_t)size) != NULL)
            goto fallback; /* over the limit, or a CR, which may end a line */
        if (PyList_Append(pending, data) < 0 ||
            set_size(decoder, D_PENDING_SIZE, held + size) < 0)
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
    if ((pieces > 0 || rest > 0) && set_size(decoder, D_PENDING_SIZE, rest) < 0)
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

/* -- The chat chunk's common cases -------------------------------------------------------------
 *
 * `ChatAccumulator.feed()` (holysheep/_chat.py) calls `chat_chunk(accumulator, event)` for each
 * event first. It takes the event when it is one of the shapes a plain chat stream is made of:
 * a JSON object whose `choices` is empty (the usage chunk) or holds one choice, of index 0,
 * whose `delta` has a `content` and a `role` that are strings or null (other delta fields
 * null) and whose `finish_reason` is a string or null; a `usage` that is null or an object of
 * the values `usage_object` builds; no `error`. So the first (role) chunk, the content chunks,
 * the finish chunk and the usage chunk, which `_chunk` took some 10 µs each to make in Python,
 * a third of what a short stream costs. It then does what `ChatAccumulator._chunk` does for it
 * and returns the `ChatChunk`. For anything else it returns None *before changing any state*,
 * and the Python code handles the event: errors, other shapes and their checks live in one
 * place only.
 *
 * Why this is the same as the Python path:
 * - the scanner accepts a subset of JSON (RFC 8259) that orjson and the json module both parse
 *   alike; at anything outside it (a `\u` escape that is not a whole character or pair, a number
 *   with an exponent over two digits or over 15 characters, nesting deeper than 64, a key with
 *   an escape, a key we read given twice, a surrogate, trailing text) it leaves the event to
 *   Python, which parses it and decides, or raises;
 * - the strings it reads (`content`, `role`, `finish_reason`) are the JSON strings decoded, as
 *   either parser decodes them, and the `usage` object is built as they build it;
 * - fields the Python path reads are checked to have the values for which it does exactly this
 *   (`index` absent or 0, no `message`, the other delta fields null); every other field Python
 *   ignores, and so does this. An empty string is no content, role or finish_reason to `_chunk`
 *   (it tests their truth), and `{}` no usage;
 * - only a `ChatAccumulator` itself (not a subclass, which may override what it does), with
 *   the default JSON parser, and neither closed nor failed, is handled.
 */

/* The classes and the slot offsets we read and write, from `setup_chat()`. */
static PyTypeObject *acc_class, *chunk_class, *delta_class, *later_class, *choice_class;
static PyTypeObject *finished_class, *report_class, *usage_class;
static PyObject *error_class; /* HolySheepError: only it carries `chunks` */
static PyObject *default_loads, *str_feed_event, *str_feed, *str_events, *zero, *one;
/* The keys of OpenAI's and Anthropic's usage objects, interned by PyInit__speedups: a usage
   object's dict takes these (as orjson takes the keys it caches), which spares making, hashing
   and comparing a new string for each, a third of building it. The first five are those
   `Usage.from_dict` reads. */
static const char *const usage_key_text[] = {
    "prompt_tokens", "completion_tokens", "total_tokens", "input_tokens", "output_tokens",
    "prompt_tokens_details", "completion_tokens_details", "cached_tokens", "audio_tokens",
    "reasoning_tokens", "accepted_prediction_tokens", "rejected_prediction_tokens",
};
#define USAGE_KEYS (sizeof(usage_key_text) / sizeof(usage_key_text[0]))
static PyObject *usage_key[USAGE_KEYS];
static Py_ssize_t usage_key_size[USAGE_KEYS];
#define str_prompt_tokens (usage_key[0])
#define str_completion_tokens (usage_key[1])
#define str_total_tokens (usage_key[2])
#define str_input_tokens (usage_key[3])
#define str_output_tokens (usage_key[4])
static Py_ssize_t block_size; /* `_BLOCK` in _chat.py */
static Py_ssize_t acc_closed, acc_error, acc_loads, acc_choice0, acc_first, acc_last, acc_count;
static Py_ssize_t acc_usage, acc_decoder, acc_done;
static Py_ssize_t chunk_text, chunk_deltas, chunk_raw, chunk_event, delta_text, delta_choice;
static Py_ssize_t later_data, later_loads, later_parsed, choice_role, choice_text, choice_blocks;
static Py_ssize_t choice_finish, finished_reason, finished_choice, report_usage;
static Py_ssize_t usage_prompt, usage_completion, usage_total, usage_raw;

typedef struct {
    int kind;
    const void *buf;
    Py_ssize_t n, i;
} Scan;

/* The character at the cursor, or -1 past the end. */
static inline Py_UCS4
peek(Scan *s)
{
    return s->i < s->n ? PyUnicode_READ(s->kind, s->buf, s->i) : (Py_UCS4)-1;
}

/* The scanner's loops keep the cursor in a local: written through `s` at every step, it must
   go to memory before each read of a character (a `Py_UCS1` may alias anything). */
static inline void
skip_ws(Scan *s)
{
    Py_ssize_t i = s->i;
    while (i < s->n) {
        Py_UCS4 c = PyUnicode_READ(s->kind, s->buf, i);
        if (c > ' ' || (c != ' ' && c != '\t' && c != '\n' && c != '\r'))
            break; /* `c > ' '` first: what ends the run is nearly always a visible character */
        i++;
    }
    s->i = i;
}

static inline int
eat(Scan *s, Py_UCS4 c)
{
    skip_ws(s);
    if (peek(s) != c)
        return 0;
    s->i++;
    return 1;
}

static int
hex4(Scan *s, Py_ssize_t at, Py_UCS4 *out)
{
    Py_UCS4 v = 0;
    if (at + 4 > s->n)
        return 0;
    for (Py_ssize_t k = at; k < at + 4; k++) {
        Py_UCS4 c = PyUnicode_READ(s->kind, s->buf, k);
        int d = c >= '0' && c <= '9'   ? (int)(c - '0')
                : c >= 'a' && c <= 'f' ? (int)(c - 'a' + 10)
                : c >= 'A' && c <= 'F' ? (int)(c - 'A' + 10)
                                       : -1;
        if (d < 0)
            return 0;
        v = v * 16 + (Py_UCS4)d;
    }
    *out = v;
    return 1;
}

/* One string escape at `s->i` (just after the backslash): its character in `*out`, the
   cursor moved past it. 0 for an escape left to Python (invalid, or a lone surrogate). */
static int
escape(Scan *s, Py_UCS4 *out)
{
    Py_UCS4 c = peek(s), high, low;
    s->i++;
    switch (c) {
    case '"': *out = '"'; return 1;
    case '\\': *out = '\\'; return 1;
    case '/': *out = '/'; return 1;
    case 'b': *out = '\b'; return 1;
    case 'f': *out = '\f'; return 1;
    case 'n': *out = '\n'; return 1;
    case 'r': *out = '\r'; return 1;
    case 't': *out = '\t'; return 1;
    case 'u':
        if (!hex4(s, s->i, &high))
            return 0;
        s->i += 4;
        if (high < 0xD800 || high > 0xDFFF) {
            *out = high;
            return 1;
        }
        if (high > 0xDBFF || s->i + 6 > s->n || PyUnicode_READ(s->kind, s->buf, s->i) != '\\' ||
            PyUnicode_READ(s->kind, s->buf, s->i + 1) != 'u' || !hex4(s, s->i + 2, &low) ||
            low < 0xDC00 || low > 0xDFFF)
            return 0; /* a lone surrogate: orjson refuses it, json does not */
        s->i += 6;
        *out = 0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00);
        return 1;
    default:
        return 0;
    }
}

/* The bytes that end a run of plain characters in a string: the control characters, the
   quote and the backslash. Set by PyInit__speedups. */
static unsigned char ends_run[256];

/* Where the run of plain characters of a string from `i` ends: at the closing quote, a
   backslash, a control character, a surrogate or the end. Every character of every string
   passes here, and nearly every chat event is of the 1-byte kind (ASCII or Latin-1, which
   holds no surrogate): it has a loop of its own, on bytes, with one look-up in `ends_run`
   where three comparisons took twice the instructions. */
static inline Py_ssize_t
plain_run(const Scan *s, Py_ssize_t i)
{
    Py_ssize_t n = s->n;
    if (s->kind == PyUnicode_1BYTE_KIND) {
        const Py_UCS1 *text = s->buf;
        while (i < n && !ends_run[text[i]])
            i++;
        return i;
    }
    while (i < n) {
        Py_UCS4 c = PyUnicode_READ(s->kind, s->buf, i);
        if (c < 0x20 || c == '"' || c == '\\' || (c >= 0xD800 && c <= 0xDFFF))
            break;
        i++;
    }
    return i;
}

/* A string at the cursor (its opening quote): checked, the cursor moved past it. `start` and
   `end` bound its raw text; `escaped` says whether it holds escapes. A chat event has some 36
   strings of 4 characters on average: made inline, each saves a call that cost as much as
   its characters (a tenth of chunk_of). */
static inline Py_ALWAYS_INLINE int
string(Scan *s, Py_ssize_t *start, Py_ssize_t *end, int *escaped)
{
    Py_UCS4 ignored;
    if (peek(s) != '"')
        return 0;
    *start = ++s->i;
    *escaped = 0;
    for (;;) {
        Py_ssize_t i = plain_run(s, s->i);
        if (i == s->n)
            return 0;
        Py_UCS4 c = PyUnicode_READ(s->kind, s->buf, i);
        s->i = i + 1;
        if (c == '"') {
            *end = i;
            return 1;
        }
        if (c != '\\')
            return 0; /* a control character (invalid) or a surrogate (not UTF-8) */
        *escaped = 1;
        if (!escape(s, &ignored))
            return 0;
    }
}

/* The text of a string checked by `string()`, escapes decoded. */
static PyObject *
string_text(Scan *s, PyObject *data, Py_ssize_t start, Py_ssize_t end, int escaped)
{
    if (!escaped)
        return PyUnicode_Substring(data, start, end);
    Py_UCS4 *text = PyMem_New(Py_UCS4, end - start);
    if (text == NULL)
        return PyErr_NoMemory();
    Py_ssize_t length = 0;
    Scan at = *s;
    at.i = start;
    while (at.i < end) {
        Py_UCS4 c = PyUnicode_READ(at.kind, at.buf, at.i++);
        if (c == '\\')
            escape(&at, &c); /* checked by string() */
        text[length++] = c;
    }
    PyObject *result = PyUnicode_FromKindAndData(PyUnicode_4BYTE_KIND, text, length);
    PyMem_Free(text);
    return result;
}

/* Whether the raw text [start, end) is the ASCII `key`. */
static int
key_is(Scan *s, Py_ssize_t start, Py_ssize_t end, const char *key)
{
    Py_ssize_t length = (Py_ssize_t)strlen(key);
    if (end - start != length)
        return 0;
    if (s->kind == PyUnicode_1BYTE_KIND)
        return memcmp((const Py_UCS1 *)s->buf + start, key, (size_t)length) == 0;
    for (Py_ssize_t k = 0; k < length; k++)
        if (PyUnicode_READ(s->kind, s->buf, start + k) != (Py_UCS4)(unsigned char)key[k])
            return 0;
    return 1;
}

static int
digits(Scan *s)
{
    Py_ssize_t from = s->i;
    while (s->i < s->n) {
        Py_UCS4 c = PyUnicode_READ(s->kind, s->buf, s->i);
        if (c < '0' || c > '9')
            break;
        s->i++;
    }
    return (int)(s->i - from);
}

/* A number, within the bounds where both parsers take it alike (see the top). */
static int
number(Scan *s)
{
    Py_ssize_t from = s->i;
    if (peek(s) == '-')
        s->i++;
    Py_UCS4 first = peek(s);
    int n = digits(s);
    if (n == 0 || (first == '0' && n > 1))
        return 0;
    if (peek(s) == '.') {
        s->i++;
        if (digits(s) == 0)
            return 0;
    }
    if (peek(s) == 'e' || peek(s) == 'E') {
        s->i++;
        if (peek(s) == '+' || peek(s) == '-')
            s->i++;
        n = digits(s);
        if (n == 0 || n > 2)
            return 0;
    }
    return s->i - from <= 15;
}

static int
literal(Scan *s, const char *word)
{
    for (const char *c = word; *c; c++, s->i++)
        if (peek(s) != (Py_UCS4)(unsigned char)*c)
            return 0;
    return 1;
}

/* Any value at the cursor, checked and skipped. */
static int
skip_value(Scan *s, int depth)
{
    Py_ssize_t a, b;
    int escaped;
    skip_ws(s);
    switch (peek(s)) {
    case '"':
        return string(s, &a, &b, &escaped);
    case 't':
        return literal(s, "true");
    case 'f':
        return literal(s, "false");
    case 'n':
        return literal(s, "null");
    case '[':
        if (depth > 64)
            return 0;
        s->i++;
        if (eat(s, ']'))
            return 1;
        do {
            if (!skip_value(s, depth + 1))
                return 0;
        } while (eat(s, ','));
        return eat(s, ']');
    case '{':
        if (depth > 64)
            return 0;
        s->i++;
        if (eat(s, '}'))
            return 1;
        do {
            skip_ws(s);
            if (!string(s, &a, &b, &escaped) || !eat(s, ':') || !skip_value(s, depth + 1))
                return 0;
        } while (eat(s, ','));
        return eat(s, '}');
    default:
        return number(s);
    }
}

static int
null(Scan *s)
{
    skip_ws(s);
    return literal(s, "null");
}

/* An object's members: `member(s, key_start, key_end, state)` reads each value; keys with
   escapes are left to Python. */
typedef int (*Member)(Scan *, Py_ssize_t, Py_ssize_t, void *);

static int
members(Scan *s, Member member, void *state)
{
    Py_ssize_t start, end;
    int escaped;
    if (!eat(s, '{'))
        return 0;
    if (eat(s, '}'))
        return 1;
    do {
        skip_ws(s);
        if (!string(s, &start, &end, &escaped) || escaped || !eat(s, ':'))
            return 0;
        skip_ws(s);
        if (!member(s, start, end, state))
            return 0;
    } while (eat(s, ','));
    return eat(s, '}');
}

typedef struct {
    Py_ssize_t content_start, content_end, role_start, role_end, finish_start, finish_end;
    Py_ssize_t usage_at; /* where the `usage` object starts */
    int content_escaped, role_escaped, finish_escaped;
    /* 0: absent; 1: given (null, for a field read with `string_or_null`); 2: given a string
       (`usage`: an object) */
    int has_content, has_role, has_delta, has_index, has_finish, has_choices, has_usage;
    int choices; /* how many: 0 or 1 */
} Shape;

/* A field that is a string or null, given once: for a string, `*given` is 2 and [start, end)
   bounds its raw text. */
static int
string_or_null(Scan *s, int *given, Py_ssize_t *start, Py_ssize_t *end, int *escaped)
{
    if ((*given)++)
        return 0;
    if (peek(s) != '"')
        return null(s);
    *given = 2;
    return string(s, start, end, escaped);
}

static int
delta_member(Scan *s, Py_ssize_t start, Py_ssize_t end, void *state)
{
    Shape *shape = state;
    if (key_is(s, start, end, "content"))
        return string_or_null(s, &shape->has_content, &shape->content_start,
                              &shape->content_end, &shape->content_escaped);
    if (key_is(s, start, end, "role"))
        return string_or_null(s, &shape->has_role, &shape->role_start, &shape->role_end,
                              &shape->role_escaped);
    return null(s); /* refusal, reasoning, tool calls, anything else: only when null */
}

static int
choice_member(Scan *s, Py_ssize_t start, Py_ssize_t end, void *state)
{
    Shape *shape = state;
    if (key_is(s, start, end, "index")) {
        if (shape->has_index++ || peek(s) != '0')
            return 0;
        s->i++;
        Py_UCS4 c = peek(s);
        return !(c == '.' || c == 'e' || c == 'E' || (c >= '0' && c <= '9'));
    }
    if (key_is(s, start, end, "delta")) {
        if (shape->has_delta++)
            return 0;
        return members(s, delta_member, shape);
    }
    if (key_is(s, start, end, "finish_reason"))
        return string_or_null(s, &shape->has_finish, &shape->finish_start, &shape->finish_end,
                              &shape->finish_escaped);
    if (key_is(s, start, end, "message"))
        return 0;
    return skip_value(s, 2);
}

static int
top_member(Scan *s, Py_ssize_t start, Py_ssize_t end, void *state)
{
    Shape *shape = state;
    if (key_is(s, start, end, "choices")) {
        if (shape->has_choices++ || !eat(s, '['))
            return 0;
        if (eat(s, ']'))
            return 1; /* none: the usage chunk */
        shape->choices = 1;
        return members(s, choice_member, shape) && eat(s, ']'); /* one at most */
    }
    if (key_is(s, start, end, "usage")) {
        if (shape->has_usage++)
            return 0;
        if (peek(s) != '{')
            return null(s);
        shape->has_usage = 2;
        shape->usage_at = s->i; /* checked here, built by `usage_object` once all is read */
        return skip_value(s, 1);
    }
    if (key_is(s, start, end, "error"))
        return 0;
    return skip_value(s, 1);
}

/* `_ChoiceState.add_text(text)`: the deltas since the last block are joined into one every
   `block_size` of them (see `_BLOCK` in _chat.py). */
static int
add_text(PyObject *choice, PyObject *text)
{
    PyObject *parts = SLOT(choice, choice_text), *blocks_object = SLOT(choice, choice_blocks);
    if (parts == NULL || blocks_object == NULL || !PyList_CheckExact(parts) ||
        !PyLong_CheckExact(blocks_object)) {
        PyErr_SetString(PyExc_TypeError, "_ChoiceState.text must be a list, blocks an int");
        return -1; /* not reached: chunk_of checked both */
    }
    Py_ssize_t blocks = PyLong_AsSsize_t(blocks_object);
    if (blocks == -1 && PyErr_Occurred())
        return -1;
    Py_INCREF(parts); /* held across allocations, which may run any finalizer */
    PyObject *tail = NULL, *joined = NULL, *one_block = NULL, *next = NULL;
    int rc = PyList_Append(parts, text);
    Py_ssize_t size = PyList_GET_SIZE(parts);
    if (rc < 0 || size - blocks < block_size || blocks > size)
        goto done;
    rc = -1;
    tail = PyList_GetSlice(parts, blocks, size);
    if (tail == NULL)
        goto done;
    joined = PyUnicode_Join(str_empty, tail);
    if (joined == NULL)
        goto done;
    one_block = PyList_New(1);
    if (one_block == NULL)
        goto done;
    PyList_SET_ITEM(one_block, 0, Py_NewRef(joined));
    next = PyLong_FromSsize_t(blocks + 1);
    if (next == NULL || PyList_SetSlice(parts, blocks, size, one_block) < 0)
        goto done;
    slot_set(choice, choice_blocks, next);
    rc = 0;
done:
    Py_XDECREF(next);
    Py_XDECREF(one_block);
    Py_XDECREF(joined);
    Py_XDECREF(tail);
    Py_DECREF(parts);
    return rc;
}

static PyObject *
new_instance(PyTypeObject *cls)
{
    return cls->tp_alloc(cls, 0);
}

/* -- The usage object: `Usage.from_dict` in C --------------------------------------------------
 *
 * `Usage.raw` is the `usage` object parsed: we build it as both parsers build it, for the values
 * they build alike and a usage object holds (objects, integers, strings, true, false, null),
 * and leave anything else to Python (an array, a float, an integer of more than 15 digits, a
 * key given twice, deep nesting). OpenAI's is two levels deep: the counts and their
 * `prompt_tokens_details` and `completion_tokens_details`. Each builder returns 1 with the
 * value in `*out`, 0 to leave the event to Python, or -1 with an exception set. */

/* OpenAI's usage object nests two deep; one nested deeper than this is left to Python (which
   bounds the recursion here too). */
#define USAGE_DEPTH 4

static int usage_object(Scan *s, PyObject *data, int depth, PyObject **out);

static int
constant(Scan *s, const char *word, PyObject *value, PyObject **out)
{
    if (!literal(s, word))
        return 0;
    *out = Py_NewRef(value);
    return 1;
}

static int
usage_value(Scan *s, PyObject *data, int depth, PyObject **out)
{
    Py_ssize_t start, end;
    int escaped;
    skip_ws(s);
    switch (peek(s)) {
    case '{':
        return usage_object(s, data, depth + 1, out);
    case '"':
        if (!string(s, &start, &end, &escaped))
            return 0;
        *out = string_text(s, data, start, end, escaped);
        return *out == NULL ? -1 : 1;
    case 'n':
        return constant(s, "null", Py_None, out);
    case 't':
        return constant(s, "true", Py_True, out);
    case 'f':
        return constant(s, "false", Py_False, out);
    default: {
        int negative = peek(s) == '-';
        s->i += negative;
        Py_UCS4 first = peek(s), next;
        start = s->i;
        int n = digits(s);
        next = peek(s);
        /* An integer of 15 digits fits a long long, and each parser makes an int of it. */
        if (n == 0 || n > 15 || (first == '0' && n > 1) || next == '.' || next == 'e' ||
            next == 'E')
            return 0;
        long long value = 0;
        for (Py_ssize_t k = start; k < s->i; k++)
            value = value * 10 + (long long)(PyUnicode_READ(s->kind, s->buf, k) - '0');
        *out = PyLong_FromLongLong(negative ? -value : value);
        return *out == NULL ? -1 : 1;
    }
    }
}

static int
usage_object(Scan *s, PyObject *data, int depth, PyObject **out)
{
    Py_ssize_t start, end;
    int escaped, rc = 0;
    PyObject *dict, *key = NULL, *value = NULL;
    if (depth > USAGE_DEPTH || !eat(s, '{'))
        return 0;
    if ((dict = PyDict_New()) == NULL)
        return -1;
    if (eat(s, '}'))
        goto built;
    do {
        skip_ws(s);
        if (!string(s, &start, &end, &escaped) || !eat(s, ':'))
            goto done;
        key = NULL;
        for (size_t k = 0; k < USAGE_KEYS && !escaped && key == NULL; k++)
            if (end - start == usage_key_size[k] && key_is(s, start, end, usage_key_text[k]))
                key = Py_NewRef(usage_key[k]);
        if (key == NULL && (key = string_text(s, data, start, end, escaped)) == NULL) {
            rc = -1;
            goto done;
        }
        if ((rc = usage_value(s, data, depth, &value)) <= 0)
            goto done;
        Py_ssize_t size = PyDict_GET_SIZE(dict);
        if (PyDict_SetItem(dict, key, value) < 0) {
            rc = -1;
            goto done;
        }
        rc = 0;
        if (PyDict_GET_SIZE(dict) == size)
            goto done; /* a key given twice */
        Py_CLEAR(key);
        Py_CLEAR(value);
    } while (eat(s, ','));
    if (!eat(s, '}'))
        goto done;
built:
    *out = dict;
    return 1;
done:
    Py_XDECREF(key);
    Py_XDECREF(value);
    Py_DECREF(dict);
    return rc;
}

/* One of `raw`'s counts, borrowed: `raw.get(name, otherwise)`. Its keys are exact str, whose
   comparison cannot fail. */
static PyObject *
count_of(PyObject *raw, PyObject *name, PyObject *otherwise)
{
    PyObject *value = PyDict_GetItemWithError(raw, name);
    return value != NULL ? value : otherwise;
}

static inline PyObject *
int_or_none(PyObject *value)
{
    /* `_count(value)`: an int, and not a bool (JSON `true` is no token count) */
    return PyLong_Check(value) && !PyBool_Check(value) ? value : Py_None;
}

/* `Usage.from_dict(raw)`, for the dict `usage_object` built. */
static PyObject *
usage_from(PyObject *raw)
{
    PyObject *prompt = int_or_none(
        count_of(raw, str_prompt_tokens, count_of(raw, str_input_tokens, Py_None)));
    PyObject *completion = int_or_none(
        count_of(raw, str_completion_tokens, count_of(raw, str_output_tokens, Py_None)));
    PyObject *total = int_or_none(count_of(raw, str_total_tokens, Py_None)), *sum = NULL, *usage;
    if (total == Py_None && prompt != Py_None && completion != Py_None) {
        total = sum = PyNumber_Add(prompt, completion);
        if (sum == NULL)
            return NULL;
    }
    usage = new_instance(usage_class);
    if (usage != NULL) {
        slot_set(usage, usage_prompt, prompt);
        slot_set(usage, usage_completion, completion);
        slot_set(usage, usage_total, total);
        slot_set(usage, usage_raw, raw);
    }
    Py_XDECREF(sum);
    return usage;
}

/* Whether `choice` is a `_ChoiceState` whose text `add_text` can take. */
static int
plain_choice(PyObject *choice)
{
    PyObject *parts = SLOT(choice, choice_text), *blocks = SLOT(choice, choice_blocks);
    return Py_TYPE(choice) == choice_class && parts != NULL && PyList_CheckExact(parts) &&
           blocks != NULL && PyLong_CheckExact(blocks);
}

/* The chunk of `event`, a new reference; None (a new reference) to leave it to Python. */
static PyObject *
chunk_of(PyObject *acc, PyObject *event)
{
    if (!chat_ready || event_class == NULL || Py_TYPE(acc) != acc_class ||
        Py_TYPE(event) != (PyTypeObject *)event_class || PyTuple_GET_SIZE(event) != 4)
        Py_RETURN_NONE;
    PyObject *type = PyTuple_GET_ITEM(event, 0), *data = PyTuple_GET_ITEM(event, 1);
    PyObject *choice0 = SLOT(acc, acc_choice0), *count = SLOT(acc, acc_count);
    /* After `[DONE]` nothing more is part of the answer: `feed_event` ignores it. */
    if (SLOT(acc, acc_closed) != Py_False || SLOT(acc, acc_error) != Py_None ||
        SLOT(acc, acc_done) != Py_False ||
        SLOT(acc, acc_loads) != default_loads || count == NULL || !PyLong_CheckExact(count) ||
        choice0 == NULL || SLOT(acc, acc_first) == NULL || !PyUnicode_CheckExact(data) ||
        !PyUnicode_CheckExact(type))
        Py_RETURN_NONE;
    if (type != str_message && PyUnicode_Compare(type, str_message) != 0)
        Py_RETURN_NONE;
#if PY_VERSION_HEX < 0x030C0000
    if (PyUnicode_READY(data) < 0)
        return NULL;
#endif

    Scan s = {PyUnicode_KIND(data), PyUnicode_DATA(data), PyUnicode_GET_LENGTH(data), 0};
    Shape shape = {0};
    if (peek(&s) != '{' || !members(&s, top_member, &shape))
        Py_RETURN_NONE;
    skip_ws(&s);
    if (s.i != s.n || (shape.choices && choice0 != Py_None && !plain_choice(choice0)))
        Py_RETURN_NONE;
    /* What `_chunk` acts on: a non-empty content, role or finish_reason, a non-empty usage. */
    int has_text = shape.has_content == 2 && shape.content_end > shape.content_start;
    int has_role = shape.has_role == 2 && shape.role_end > shape.role_start;
    int has_finish = shape.has_finish == 2 && shape.finish_end > shape.finish_start;

    /* Everything is made before any state changes: the usage object may yet be Python's, and
       allocating may run the garbage collector, and any finalizer with it (what we use of the
       accumulator is held here, so that such code cannot free it under us). */
    PyObject *text = NULL, *role = NULL, *finish = NULL, *raw_usage = NULL, *usage = NULL;
    PyObject *state = NULL, *next = NULL, *delta = NULL, *finished = NULL, *report = NULL;
    PyObject *deltas = NULL, *later = NULL, *chunk = NULL, *result = NULL;
    Py_INCREF(choice0);
    Py_INCREF(count);
    if (has_text && (text = string_text(&s, data, shape.content_start, shape.content_end,
                                        shape.content_escaped)) == NULL)
        goto done;
    if (has_role && (role = string_text(&s, data, shape.role_start, shape.role_end,
                                        shape.role_escaped)) == NULL)
        goto done;
    if (has_finish && (finish = string_text(&s, data, shape.finish_start, shape.finish_end,
                                            shape.finish_escaped)) == NULL)
        goto done;
    if (shape.has_usage == 2) {
        Scan at = s;
        at.i = shape.usage_at;
        int rc = usage_object(&at, data, 1, &raw_usage);
        if (rc <= 0) {
            result = rc < 0 ? NULL : Py_NewRef(Py_None);
            goto done;
        }
        /* `{}` is no usage to Python (it is falsy), as null is */
        if (PyDict_GET_SIZE(raw_usage) > 0 && (usage = usage_from(raw_usage)) == NULL)
            goto done;
    }
    if (shape.choices) {
        /* `_ChoiceState(0)`, called: a class of attrs, whose defaults live in Python. The
           first chunk of a stream makes it: once per stream, and it costs 1/10 of `_chunk`. */
        state = choice0 != Py_None ? Py_NewRef(choice0)
                                   : PyObject_CallOneArg((PyObject *)choice_class, zero);
        if (state == NULL)
            goto done;
        if (!plain_choice(state)) {
            result = Py_NewRef(Py_None); /* not reached: our class makes a plain one */
            goto done;
        }
    }
    if ((next = PyNumber_Add(count, one)) == NULL)
        goto done;

    PyObject *items[3];
    Py_ssize_t made = 0;
    if (has_text) {
        if ((delta = new_instance(delta_class)) == NULL)
            goto done;
        slot_set(delta, delta_text, text);
        slot_set(delta, delta_choice, zero);
        items[made++] = untracked(delta); /* frozen: a str and an int */
    }
    if (has_finish) {
        if ((finished = new_instance(finished_class)) == NULL)
            goto done;
        slot_set(finished, finished_reason, finish);
        slot_set(finished, finished_choice, zero);
        items[made++] = untracked(finished); /* frozen: a str and an int */
    }
    if (usage != NULL) {
        if ((report = new_instance(report_class)) == NULL)
            goto done;
        slot_set(report, report_usage, usage);
        items[made++] = report;
    }
    if ((deltas = PyTuple_New(made)) == NULL)
        goto done;
    for (Py_ssize_t k = 0; k < made; k++)
        PyTuple_SET_ITEM(deltas, k, Py_NewRef(items[k]));
    if (report == NULL)
        untracked(deltas); /* of untracked deltas only (a usage report holds a dict) */
    later = new_instance(later_class);
    chunk = new_instance(chunk_class);
    if (later == NULL || chunk == NULL)
        goto done;
    slot_set(later, later_data, data);
    slot_set(later, later_loads, default_loads);
    slot_set(later, later_parsed, Py_None);
    slot_set(chunk, chunk_text, has_text ? text : str_empty);
    slot_set(chunk, chunk_deltas, deltas);
    slot_set(chunk, chunk_raw, later);
    slot_set(chunk, chunk_event, event);

    /* Everything is made: from here on, state changes as `_chunk` changes it, in its order. */
    slot_set(acc, acc_count, next);
    if (SLOT(acc, acc_first) == Py_None)
        slot_set(acc, acc_first, data);
    slot_set(acc, acc_last, data);
    if (state != NULL && state != choice0)
        slot_set(acc, acc_choice0, state);
    if (has_text && add_text(state, text) < 0)
        goto done;
    if (has_role)
        slot_set(state, choice_role, role);
    if (has_finish)
        slot_set(state, choice_finish, finish);
    if (usage != NULL)
        slot_set(acc, acc_usage, usage);
    result = Py_NewRef(chunk);
done:
    Py_DECREF(choice0);
    Py_DECREF(count);
    Py_XDECREF(text);
    Py_XDECREF(role);
    Py_XDECREF(finish);
    Py_XDECREF(raw_usage);
    Py_XDECREF(usage);
    Py_XDECREF(state);
    Py_XDECREF(next);
    Py_XDECREF(delta);
    Py_XDECREF(finished);
    Py_XDECREF(report);
    Py_XDECREF(deltas);
    Py_XDECREF(later);
    Py_XDECREF(chunk);
    return result;
}

static PyObject *
chat_chunk(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "chat_chunk(accumulator, event)");
        return NULL;
    }
    return chunk_of(args[0], args[1]);
}

/* The chunk of one event of a read, a new reference: from `chunk_of`, else `feed_event`.
   None if it has none; NULL with an exception set if `feed_event` raised. */
static PyObject *
chunk_for(PyObject *acc, PyObject *event)
{
    Py_INCREF(event); /* held: `feed_event` runs Python code */
    PyObject *chunk = chunk_of(acc, event);
    if (chunk == Py_None) {
        Py_DECREF(chunk);
        chunk = PyObject_CallMethodOneArg(acc, str_feed_event, event);
    }
    Py_DECREF(event);
    return chunk;
}

/* One event of a read: its chunk appended to `chunks` unless there is none. -1 with an
   exception set if `feed_event` raised. */
static int
take_event(PyObject *acc, PyObject *event, PyObject *chunks)
{
    PyObject *chunk = chunk_for(acc, event);
    if (chunk == NULL)
        return -1;
    int rc = chunk == Py_None ? 0 : PyList_Append(chunks, chunk);
    Py_DECREF(chunk);
    return rc;
}

/* The chunks a read completed before its error, the first `made` of `chunks`, go with the
   error, as `ChatAccumulator.feed` does (`HolySheepError.chunks`): they are accumulated
   already, and the caller must get them. Only our errors carry them, as in Python: any other
   exception is a bug, and goes on as it was raised. What follows them in `chunks` is cut. */
static void
attach_chunks(PyObject *chunks, Py_ssize_t made)
{
    if (made == 0 || !PyErr_ExceptionMatches(error_class))
        return;
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    if (PyList_GET_SIZE(chunks) > made && PyList_SetSlice(chunks, made, PY_SSIZE_T_MAX, NULL) < 0)
        PyErr_Clear(); /* out of memory: the error goes without them */
    else if (value != NULL && PyObject_SetAttrString(value, "chunks", chunks) < 0)
        PyErr_Clear();
    PyErr_Restore(type, value, traceback);
}

/* An error fetched to be raised again later (`PyErr_Fetch`, `PyErr_Restore`). */
typedef struct {
    PyObject *type, *value, *traceback;
} Failure;

/* When the decoder raised: the events its error carries, a new reference, with the error
   fetched into `*failure`, to be raised once their chunks are made; NULL, the error left
   raised, if it carries none. `SSEDecoder` puts the events a read completed before a line it
   refuses (a limit) on the error's `events`; this is what `ChatAccumulator.feed` does with
   them (`_decode` in _chat.py): only our errors, and only events that are there (true). */
static PyObject *
events_before_error(Failure *failure)
{
    if (!PyErr_ExceptionMatches(error_class))
        return NULL;
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    PyObject *events = value == NULL ? NULL : PyObject_GetAttr(value, str_events);
    int some = events == NULL ? 0 : PyObject_IsTrue(events);
    if (some > 0) {
        failure->type = type;
        failure->value = value;
        failure->traceback = traceback;
        return events;
    }
    Py_XDECREF(events);
    if (some < 0) { /* as `not events` raises in Python: that error goes on */
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(traceback);
        return NULL;
    }
    PyErr_Clear(); /* no `events`: the decoder's error goes on as it was raised */
    PyErr_Restore(type, value, traceback);
    return NULL;
}

/* The chunks of the events the decoder's C part decoded, in the list it made for them: each
   chunk takes the place of the first event not yet replaced (its own, or one that had no
   chunk), and what is left after the last chunk is cut off. The list is ours alone, made by
   `feed` for this read: a second list, for the chunks, cost some 280 instructions a read
   (made, filled and freed), 3% of `ChatAccumulator.feed` for a read of one event. */
static PyObject *
chunks_in_place(PyObject *acc, PyObject *events)
{
    Py_ssize_t made = 0;
    for (Py_ssize_t k = 0; k < PyList_GET_SIZE(events); k++) {
        PyObject *chunk = chunk_for(acc, PyList_GET_ITEM(events, k));
        if (chunk == NULL)
            goto error;
        if (chunk == Py_None)
            Py_DECREF(chunk);
        else
            PyList_SetItem(events, made++, chunk); /* drops an event done with */
    }
    if (made < PyList_GET_SIZE(events) && PyList_SetSlice(events, made, PY_SSIZE_T_MAX, NULL) < 0)
        goto error;
    return events;
error:
    attach_chunks(events, made);
    Py_DECREF(events);
    return NULL;
}

/* The first read of a stream, for a plain decoder (`SSEDecoder` itself) whose `_special` is
   True: 1 if it is an ordinary one, and then the decoder is left as `_special_start` leaves it
   (`_at_start` and `_special` False) for `feed` to take the read; 0, having changed nothing,
   for Python to handle. Ordinary: the decoder is at the start of the stream and only there
   (not closed, not failed, no CR ending the last read, nothing held back), and the read's
   first byte is not 0xEF, so it cannot begin a byte order mark (EF BB BF), which is all
   `_strip_bom` looks for. Through Python, the first read of every stream cost some 7,000
   instructions (three Python calls) just to learn that. */
static int
plain_start(PyObject *decoder, PyObject *data)
{
    if (!PyBytes_CheckExact(data) || PyBytes_GET_SIZE(data) == 0 ||
        (unsigned char)PyBytes_AS_STRING(data)[0] == 0xEF)
        return 0;
    PyObject *pending = SLOT(decoder, decoder_slot[D_PENDING]);
    if (SLOT(decoder, decoder_slot[D_AT_START]) != Py_True ||
        SLOT(decoder, decoder_slot[D_SKIP_LF]) != Py_False ||
        SLOT(decoder, decoder_slot[D_CLOSED]) != Py_False ||
        SLOT(decoder, decoder_slot[D_FAILED]) != Py_None || pending == NULL ||
        !PyList_CheckExact(pending) || PyList_GET_SIZE(pending) != 0)
        return 0;
    slot_set(decoder, decoder_slot[D_AT_START], Py_False);
    slot_set(decoder, decoder_slot[D_SPECIAL], Py_False);
    return 1;
}

/* `ChatAccumulator.feed(data)`: the events of the read (decoded by the decoder's C part when
   it takes the read, else by `decoder.feed`), each made a chunk by `chunk_of` or else by
   `feed_event`. None, having changed nothing, for anything but a `ChatAccumulator` itself. */
static PyObject *
chat_feed(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "chat_feed(accumulator, data)");
        return NULL;
    }
    PyObject *acc = args[0], *events = NULL;
    if (!chat_ready || Py_TYPE(acc) != acc_class)
        Py_RETURN_NONE;
    PyObject *decoder = SLOT(acc, acc_decoder);
    if (decoder == NULL)
        Py_RETURN_NONE;
    Py_INCREF(decoder); /* held: decoding may run code that replaces it */
    if (Py_TYPE(decoder) == decoder_class &&
        (SLOT(decoder, decoder_slot[D_SPECIAL]) == Py_False ||
         (SLOT(decoder, decoder_slot[D_SPECIAL]) == Py_True && plain_start(decoder, args[1])))) {
        PyObject *decode_args[2] = {decoder, args[1]};
        events = feed(module, decode_args, 2);
        if (events == Py_None)
            Py_CLEAR(events);
        else {
            Py_DECREF(decoder);
            return events == NULL ? NULL : chunks_in_place(acc, events);
        }
    }
    Failure failure = {NULL, NULL, NULL};
    if (events == NULL) { /* a byte order mark, a CR at the end of the last read, ... */
        events = PyObject_CallMethodOneArg(decoder, str_feed, args[1]);
        if (events == NULL)
            events = events_before_error(&failure);
    }
    Py_DECREF(decoder);
    if (events == NULL)
        return NULL;
    PyObject *chunks = PyList_New(0), *event, *each = NULL;
    if (chunks == NULL)
        goto error;
    if (PyList_CheckExact(events)) {
        for (Py_ssize_t k = 0; k < PyList_GET_SIZE(events); k++)
            if (take_event(acc, PyList_GET_ITEM(events, k), chunks) < 0)
                goto error;
    }
    else { /* a decoder of the caller's own: its events one at a time, as Python takes them */
        each = PyObject_GetIter(events);
        if (each == NULL)
            goto error;
        while ((event = PyIter_Next(each)) != NULL) {
            int rc = take_event(acc, event, chunks);
            Py_DECREF(event);
            if (rc < 0)
                goto error;
        }
        if (PyErr_Occurred())
            goto error;
        Py_DECREF(each);
    }
    Py_DECREF(events);
    if (failure.value == NULL)
        return chunks;
    PyErr_Restore(failure.type, failure.value, failure.traceback); /* raised after its events */
    attach_chunks(chunks, PyList_GET_SIZE(chunks));
    Py_DECREF(chunks);
    return NULL;
error: /* an error among the events comes before the decoder's, which is dropped */
    Py_XDECREF(failure.type);
    Py_XDECREF(failure.value);
    Py_XDECREF(failure.traceback);
    if (chunks != NULL)
        attach_chunks(chunks, PyList_GET_SIZE(chunks));
    Py_XDECREF(each);
    Py_DECREF(events);
    Py_XDECREF(chunks);
    return NULL;
}

/* The offset of `cls`'s slot `name`, from its member descriptor; -1 with an error if none. */
static Py_ssize_t
slot_offset(PyTypeObject *cls, const char *name)
{
    PyObject *descr = PyDict_GetItemString(cls->tp_dict, name); /* borrowed */
    if (descr == NULL || !Py_IS_TYPE(descr, &PyMemberDescr_Type) ||
        ((PyMemberDescrObject *)descr)->d_member->type != T_OBJECT_EX) {
        PyErr_Format(PyExc_TypeError, "%s has no slot %s", cls->tp_name, name);
        return -1;
    }
    return ((PyMemberDescrObject *)descr)->d_member->offset;
}

/* How many object slots `cls` has (member descriptors, its own and its bases'). */
static int
object_slots(PyTypeObject *cls)
{
    PyObject *mro = cls->tp_mro, *name, *value;
    int found = 0;
    for (Py_ssize_t k = 0; mro != NULL && k < PyTuple_GET_SIZE(mro); k++) {
        PyTypeObject *base = (PyTypeObject *)PyTuple_GET_ITEM(mro, k);
        Py_ssize_t pos = 0;
        while (base->tp_dict != NULL && PyDict_Next(base->tp_dict, &pos, &name, &value))
            if (Py_IS_TYPE(value, &PyMemberDescr_Type) &&
                ((PyMemberDescrObject *)value)->d_member->type == T_OBJECT_EX)
                found++;
    }
    return found;
}

static PyObject *
setup_chat(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 12) {
        PyErr_SetString(PyExc_TypeError,
                        "setup_chat(ChatAccumulator, _ChoiceState, ChatChunk, ContentDelta, "
                        "Finished, UsageReport, Usage, _ParsedLater, SSEDecoder, HolySheepError, "
                        "loads, block)");
        return NULL;
    }
    for (Py_ssize_t k = 0; k < 9; k++)
        if (!PyType_Check(args[k])) {
            PyErr_SetString(PyExc_TypeError, "setup_chat() takes nine classes first");
            return NULL;
        }
    if (!PyExceptionClass_Check(args[9])) {
        PyErr_SetString(PyExc_TypeError, "setup_chat() takes an exception class tenth");
        return NULL;
    }
    PyTypeObject *acc = (PyTypeObject *)args[0], *choice = (PyTypeObject *)args[1],
                 *chunk = (PyTypeObject *)args[2], *delta = (PyTypeObject *)args[3],
                 *finished = (PyTypeObject *)args[4], *report = (PyTypeObject *)args[5],
                 *usage = (PyTypeObject *)args[6], *later = (PyTypeObject *)args[7],
                 *decoder = (PyTypeObject *)args[8];
    Py_ssize_t block = PyLong_AsSsize_t(args[11]);
    if (block < 1) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "setup_chat(): block must be positive");
        return NULL;
    }
    struct {
        Py_ssize_t *offset;
        PyTypeObject *cls;
        const char *name;
    } slots[] = {
        {&acc_closed, acc, "_closed"},
        {&acc_error, acc, "_error"},
        {&acc_loads, acc, "_loads"},
        {&acc_choice0, acc, "_choice0"},
        {&acc_first, acc, "_first_data"},
        {&acc_last, acc, "_last_data"},
        {&acc_count, acc, "chunk_count"},
        {&acc_usage, acc, "_usage"},
        {&acc_decoder, acc, "decoder"},
        {&acc_done, acc, "done"},
        {&choice_role, choice, "role"},
        {&choice_text, choice, "text"},
        {&choice_blocks, choice, "blocks"},
        {&choice_finish, choice, "finish_reason"},
        {&finished_reason, finished, "reason"},
        {&finished_choice, finished, "choice"},
        {&report_usage, report, "usage"},
        {&usage_prompt, usage, "prompt_tokens"},
        {&usage_completion, usage, "completion_tokens"},
        {&usage_total, usage, "total_tokens"},
        {&usage_raw, usage, "raw"},
        {&chunk_text, chunk, "text"},
        {&chunk_deltas, chunk, "deltas"},
        {&chunk_raw, chunk, "raw"},
        {&chunk_event, chunk, "event"},
        {&delta_text, delta, "text"},
        {&delta_choice, delta, "choice"},
        {&later_data, later, "_data"},
        {&later_loads, later, "_loads"},
        {&later_parsed, later, "_parsed"},
    };
    size_t count = sizeof(slots) / sizeof(slots[0]);
    Py_ssize_t offsets[sizeof(slots) / sizeof(slots[0])];
    for (size_t k = 0; k < count; k++) {
        offsets[k] = slot_offset(slots[k].cls, slots[k].name);
        if (offsets[k] < 0)
            return NULL;
    }
    Py_ssize_t decoder_offsets[D_COUNT];
    for (int k = 0; k < D_COUNT; k++) {
        decoder_offsets[k] = slot_offset(decoder, decoder_attr_text[k]);
        if (decoder_offsets[k] < 0)
            return NULL;
    }
    /* The classes built here must have no slot but those set above: one more would be left
       empty, where `_chunk` sets it. */
    if (object_slots(chunk) != 4 || object_slots(delta) != 2 || object_slots(later) != 3 ||
        object_slots(finished) != 2 || object_slots(report) != 1 || object_slots(usage) != 4) {
        PyErr_SetString(PyExc_TypeError, "setup_chat(): ChatChunk, ContentDelta, Finished, "
                                         "UsageReport, Usage or _ParsedLater has new slots");
        return NULL;
    }
    chat_ready = 0; /* nothing is taken while the offsets change */
    for (size_t k = 0; k < count; k++)
        *slots[k].offset = offsets[k];
    memcpy(decoder_slot, decoder_offsets, sizeof(decoder_slot));
    if (str_feed_event == NULL &&
        (str_feed_event = PyUnicode_InternFromString("feed_event")) == NULL)
        return NULL;
    if (str_feed == NULL && (str_feed = PyUnicode_InternFromString("feed")) == NULL)
        return NULL;
    if (str_events == NULL && (str_events = PyUnicode_InternFromString("events")) == NULL)
        return NULL;
    if (zero == NULL && (zero = PyLong_FromLong(0)) == NULL)
        return NULL;
    if (one == NULL && (one = PyLong_FromLong(1)) == NULL)
        return NULL;
    Py_XSETREF(acc_class, (PyTypeObject *)Py_NewRef(acc));
    Py_XSETREF(choice_class, (PyTypeObject *)Py_NewRef(choice));
    Py_XSETREF(chunk_class, (PyTypeObject *)Py_NewRef(chunk));
    Py_XSETREF(delta_class, (PyTypeObject *)Py_NewRef(delta));
    Py_XSETREF(later_class, (PyTypeObject *)Py_NewRef(later));
    Py_XSETREF(finished_class, (PyTypeObject *)Py_NewRef(finished));
    Py_XSETREF(report_class, (PyTypeObject *)Py_NewRef(report));
    Py_XSETREF(usage_class, (PyTypeObject *)Py_NewRef(usage));
    Py_XSETREF(decoder_class, (PyTypeObject *)Py_NewRef(decoder));
    Py_XSETREF(error_class, Py_NewRef(args[9]));
    Py_XSETREF(default_loads, Py_NewRef(args[10]));
    block_size = block;
    chat_ready = 1;
    Py_RETURN_NONE;
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
    {"chat_chunk", (PyCFunction)(void (*)(void))chat_chunk, METH_FASTCALL,
     "chat_chunk(accumulator, event): the ChatChunk of a common event, or None for Python."},
    {"chat_feed", (PyCFunction)(void (*)(void))chat_feed, METH_FASTCALL,
     "chat_feed(accumulator, data): the chunks of a read, or None for Python."},
    {"setup_chat", (PyCFunction)(void (*)(void))setup_chat, METH_FASTCALL,
     "setup_chat(ChatAccumulator, _ChoiceState, ChatChunk, ContentDelta, Finished, "
     "UsageReport, Usage, _ParsedLater, SSEDecoder, HolySheepError, loads, block): the "
     "classes and values chat_chunk uses."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "holysheep._speedups",
    .m_doc = "The common cases of the SSE decoder and of a chat chunk in C; see _speedups.c.",
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
        {&str_empty, ""},
    };
    for (size_t k = 0; k < USAGE_KEYS; k++) {
        usage_key_size[k] = (Py_ssize_t)strlen(usage_key_text[k]);
        if (usage_key[k] == NULL &&
            (usage_key[k] = PyUnicode_InternFromString(usage_key_text[k])) == NULL)
            return NULL;
    }
    for (int c = 0; c < 0x20; c++)
        ends_run[c] = 1;
    ends_run['"'] = ends_run['\\'] = 1;
    for (int k = 0; k < D_COUNT; k++) {
        if (decoder_attr[k] == NULL &&
            (decoder_attr[k] = PyUnicode_InternFromString(decoder_attr_text[k])) == NULL)
            return NULL;
    }
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (*names[i].slot != NULL)
            continue;
        *names[i].slot = PyUnicode_InternFromString(names[i].text);
        if (*names[i].slot == NULL)
            return NULL;
    }
    return PyModule_Create(&module);
}
