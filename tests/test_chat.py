"""The chat stream layer: chunks in, typed deltas and one Completion out."""

from __future__ import annotations

import json
import tracemalloc
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import holysheep
from holysheep import (
    ChatAccumulator,
    Completion,
    ContentDelta,
    Finished,
    IncompleteStreamError,
    LocalProtocolError,
    ReasoningDelta,
    RefusalDelta,
    RemoteProtocolError,
    ServerSentEvent,
    StreamError,
    ToolCall,
    ToolCallDelta,
    Usage,
    UsageReport,
    is_retryable_error,
)
from holysheep.transports import MockResponse, MockTransport, sse_body


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> bytes:
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "gpt-4.1",
        "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}],
    }
    body.update(extra)
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def usage_chunk(prompt: int, completion: int) -> bytes:
    usage = {"prompt_tokens": prompt, "completion_tokens": completion}
    usage["total_tokens"] = prompt + completion
    return chunk(choices=[], usage=usage)


DONE = b"data: [DONE]\n\n"


def openai_stream(tokens: list[str]) -> bytes:
    return b"".join(
        [
            chunk({"role": "assistant", "content": ""}),
            *(chunk({"content": t}) for t in tokens),
            chunk(finish="stop"),
            usage_chunk(5, len(tokens)),
            DONE,
        ]
    )


def run(stream: bytes, **options: Any) -> ChatAccumulator:
    acc = ChatAccumulator(**options)
    acc.feed(stream)
    acc.close()
    return acc


def test_a_stream_accumulates_into_a_completion() -> None:
    """Text, role, finish reason, usage and metadata all land on the Completion."""
    completion = run(openai_stream(["Hel", "lo", ", ", "sheep"])).completion
    assert "Hello, sheep" == completion.text
    assert ("assistant", "stop") == (completion.role, completion.finish_reason)
    assert Usage(5, 4, 9) == completion.usage
    assert ("chatcmpl-1", "gpt-4.1", 1700000000) == (
        completion.id,
        completion.model,
        completion.created,
    )
    assert [] == list(completion.last_chunk["choices"])  # type: ignore[index]


def test_chunks_carry_text_and_typed_deltas() -> None:
    """Each chunk says what it added, typed; `text` is choice 0's content."""
    acc = ChatAccumulator()
    chunks = acc.feed(openai_stream(["a", "b"]))
    assert ["", "a", "b", "", ""] == [c.text for c in chunks]
    assert (ContentDelta("a"),) == chunks[1].deltas
    assert (Finished("stop"),) == chunks[3].deltas
    assert (UsageReport(Usage(5, 2, 7)),) == chunks[4].deltas
    assert ("chatcmpl-1", "gpt-4.1") == (chunks[1].id, chunks[1].model)
    assert acc.done


def test_keepalives_and_dataless_events_are_ignored() -> None:
    """Comments, empty data and unknown event types produce no chunk."""
    stream = (
        b": keep-alive\n\n" + b"data:\n\n" + b"event: ping\ndata: {}\n\n" + openai_stream(["x"])
    )
    acc = ChatAccumulator()
    assert 4 == len(acc.feed(stream))  # role, "x", finish, usage
    acc.close()
    assert "x" == acc.completion.text


def test_several_choices_accumulate_separately() -> None:
    """With `n > 1`, each choice has its own text and finish reason."""
    stream = b"".join(
        [
            chunk(
                choices=[
                    {"index": 0, "delta": {"content": "a"}},
                    {"index": 1, "delta": {"content": "x"}},
                ]
            ),
            chunk(choices=[{"index": 1, "delta": {"content": "y"}, "finish_reason": "length"}]),
            chunk(choices=[{"index": 0, "delta": {"content": "b"}, "finish_reason": "stop"}]),
            DONE,
        ]
    )
    completion = run(stream).completion
    assert [("ab", "stop"), ("xy", "length")] == [
        (c.text, c.finish_reason) for c in completion.choices
    ]


def test_choices_are_listed_by_index_whatever_order_they_arrive_in() -> None:
    """Choice 0 (kept apart from the others) may come after them; the list is by index."""
    stream = b"".join(
        [
            chunk(choices=[{"index": 2, "delta": {"content": "z"}}]),
            chunk(choices=[{"index": 1, "delta": {"content": "y"}}]),
            chunk(choices=[{"index": 0, "delta": {"content": "x"}, "finish_reason": "stop"}]),
            DONE,
        ]
    )
    completion = run(stream).completion
    assert [(0, "x"), (1, "y"), (2, "z")] == [(c.index, c.text) for c in completion.choices]
    assert "x" == completion.text


def test_a_partial_completion_before_choice_0_began_reads_choice_0() -> None:
    """chat.md: `text`, `finish_reason` and friends read choice 0. A stream cut before choice
    0 began (`n=2`, choice 1 first) read choice 1 instead: the error's completion said "y",
    text no chunk's `text` (choice 0's) ever showed."""
    acc = ChatAccumulator(choices=2)
    body = chunk(choices=[{"index": 1, "delta": {"content": "y"}, "finish_reason": "stop"}])
    assert [""] == [c.text for c in acc.feed(body)]
    with pytest.raises(IncompleteStreamError) as info:
        acc.close()
    completion = info.value.completion
    assert completion is not None
    assert ("", None, None, ()) == (
        completion.text,
        completion.role,
        completion.finish_reason,
        completion.tool_calls,
    )
    assert [(1, "y")] == [(c.index, c.text) for c in completion.choices]


def test_a_negative_choice_index_listed_first_does_not_hide_choice_0() -> None:
    """A gateway's choice -1 sorts before choice 0; `text` and `finish_reason` still read 0."""
    stream = b"".join(
        [
            chunk(choices=[{"index": -1, "delta": {"content": "minus"}, "finish_reason": "stop"}]),
            chunk(choices=[{"index": 0, "delta": {"content": "zero"}, "finish_reason": "length"}]),
            DONE,
        ]
    )
    completion = run(stream).completion
    assert [-1, 0] == [c.index for c in completion.choices]
    assert ("zero", "length") == (completion.text, completion.finish_reason)


def test_reasoning_and_refusal_are_kept_apart_from_text() -> None:
    """DeepSeek-style reasoning and refusals do not leak into `text`."""
    acc = ChatAccumulator()
    chunks = acc.feed(
        chunk({"reasoning_content": "think"})
        + chunk({"reasoning": "ing"})
        + chunk({"refusal": "no"})
        + chunk({"content": "ok"}, "stop")
        + DONE
    )
    acc.close()
    assert (ReasoningDelta("think"),) == chunks[0].deltas
    assert (RefusalDelta("no"),) == chunks[2].deltas
    completion = acc.completion
    assert ("thinking", "no", "ok") == (completion.reasoning, completion.refusal, completion.text)


# -- tool calls -------------------------------------------------------------------------------


def tool_stream(*fragment_lists: list[dict[str, Any]]) -> bytes:
    parts = [chunk({"tool_calls": fragments}) for fragments in fragment_lists]
    return b"".join([*parts, chunk(finish="tool_calls"), DONE])


def fn(name: str | None = None, arguments: Any = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if name is not None:
        out["name"] = name
    if arguments is not None:
        out["arguments"] = arguments
    return out


def test_tool_call_fragments_merge_by_index() -> None:
    """OpenAI's shape: id and name once, then argument fragments by index."""
    stream = tool_stream(
        [{"index": 0, "id": "call_a", "type": "function", "function": fn("get", "")}],
        [{"index": 0, "function": fn(arguments='{"ci')}],
        [{"index": 0, "function": fn(arguments='ty": "Oslo"}')}],
    )
    calls = run(stream).completion.tool_calls
    assert (ToolCall("call_a", "get", '{"city": "Oslo"}', 0),) == calls
    assert {"city": "Oslo"} == calls[0].parsed_arguments()


def test_parallel_tool_calls_interleaved_by_index() -> None:
    """Two calls streamed in alternation stay apart."""
    stream = tool_stream(
        [
            {"index": 0, "id": "a", "function": fn("f", "")},
            {"index": 1, "id": "b", "function": fn("g", "")},
        ],
        [{"index": 1, "function": fn(arguments="[2")}],
        [{"index": 0, "function": fn(arguments="[1")}],
        [{"index": 0, "function": fn(arguments="]")}, {"index": 1, "function": fn(arguments="]")}],
    )
    calls = run(stream).completion.tool_calls
    assert [("a", "f", "[1]"), ("b", "g", "[2]")] == [(c.id, c.name, c.arguments) for c in calls]


def test_tool_calls_are_listed_by_index_whatever_order_they_arrive_in() -> None:
    """As the OpenAI SDK lists them: a call at index 1 sent before index 0 is still second."""
    stream = tool_stream(
        [
            {"index": 1, "id": "b", "function": fn("g", "{}")},
            {"index": 0, "id": "a", "function": fn("f", "{}")},
        ]
    )
    calls = run(stream).completion.tool_calls
    assert [(0, "a"), (1, "b")] == [(c.index, c.id) for c in calls]


def test_duplicate_index_in_one_chunk_appends_in_order() -> None:
    """Two fragments for the same index in one chunk are both kept, in order."""
    stream = tool_stream(
        [
            {"index": 0, "id": "a", "function": fn("f", "{")},
            {"index": 0, "function": fn(arguments="}")},
        ]
    )
    assert "{}" == run(stream).completion.tool_calls[0].arguments


def test_each_parallel_call_complete_in_one_chunk() -> None:
    """Gateways that send every call whole, one per chunk."""
    stream = tool_stream(
        [{"index": 0, "id": "a", "function": fn("f", '{"x": 1}')}],
        [{"index": 1, "id": "b", "function": fn("g", '{"y": 2}')}],
    )
    calls = run(stream).completion.tool_calls
    assert ['{"x": 1}', '{"y": 2}'] == [c.arguments for c in calls]


def test_missing_index_falls_back_to_id() -> None:
    """Without `index`, fragments are matched by `id`."""
    stream = tool_stream(
        [{"id": "a", "function": fn("f", "{")}],
        [{"id": "b", "function": fn("g", "[")}],
        [{"id": "a", "function": fn(arguments="}")}],
        [{"id": "b", "function": fn(arguments="]")}],
    )
    calls = run(stream).completion.tool_calls
    assert [("a", "f", "{}", 0), ("b", "g", "[]", 1)] == [
        (c.id, c.name, c.arguments, c.index) for c in calls
    ]


def test_a_new_call_without_index_takes_an_unused_index() -> None:
    """A call numbered 1 by the server, then one with no index: the second does not take
    index 1, so the first call's later fragments still find it."""
    stream = tool_stream(
        [{"index": 1, "id": "a", "function": fn("f", '{"x":')}],
        [{"id": "b", "function": fn("g", "{}")}],
        [{"index": 1, "function": fn(arguments="1}")}],
    )
    calls = run(stream).completion.tool_calls
    assert [("a", "f", '{"x":1}', 1), ("b", "g", "{}", 2)] == [
        (c.id, c.name, c.arguments, c.index) for c in calls
    ]


def test_tool_call_fragments_that_are_not_objects_are_skipped() -> None:
    """A string or a number among `tool_calls` is no fragment: the calls around it merge."""
    stream = tool_stream(
        [{"index": 0, "id": "a", "function": fn("f", "{")}, "junk", 7],
        [None, {"index": 0, "function": fn(arguments="}")}],
    )
    calls = run(stream).completion.tool_calls
    assert [("a", "f", "{}")] == [(c.id, c.name, c.arguments) for c in calls]


def test_a_tool_call_fragment_without_a_function_object_keeps_its_id_and_type() -> None:
    """No `function` (or one that is not an object) adds no name or arguments, but the call
    still exists with its id and type, and later fragments complete it."""
    stream = tool_stream(
        [{"index": 0, "id": "a", "type": "custom"}],
        [{"index": 0, "function": "not an object"}],
        [{"index": 0, "function": fn("f", "{}")}],
    )
    calls = run(stream).completion.tool_calls
    assert [("a", "custom", "f", "{}")] == [(c.id, c.type, c.name, c.arguments) for c in calls]


def test_fragments_without_index_or_id_continue_the_latest_call() -> None:
    """A bare fragment belongs to the call being streamed."""
    stream = tool_stream([{"id": "a", "function": fn("f", "{")}], [{"function": fn(arguments="}")}])
    assert "{}" == run(stream).completion.tool_calls[0].arguments


def test_id_and_name_repeated_on_every_fragment_are_not_duplicated() -> None:
    """Some gateways resend id and name with each fragment."""
    stream = tool_stream(
        [{"index": 0, "id": "a", "function": fn("f", "{")}],
        [{"index": 0, "id": "a", "function": fn("f", "}")}],
    )
    assert [("a", "f", "{}")] == [
        (c.id, c.name, c.arguments) for c in run(stream).completion.tool_calls
    ]


def test_reused_index_with_a_new_id_is_a_new_call() -> None:
    """Gateways that put every parallel call at index 0 still yield separate calls."""
    stream = tool_stream(
        [{"index": 0, "id": "a", "function": fn("f", "{}")}],
        [{"index": 0, "id": "b", "function": fn("g", "[]")}],
    )
    calls = run(stream).completion.tool_calls
    assert [("a", "f", "{}"), ("b", "g", "[]")] == [(c.id, c.name, c.arguments) for c in calls]


def test_parallel_calls_at_one_index_interleaved_each_with_its_id_stay_apart() -> None:
    """A gateway that puts every call at index 0 and repeats the id on every fragment, with
    the calls' fragments interleaved: each fragment joins the call of its id (there were four
    broken calls, the continuations nameless)."""
    stream = tool_stream(
        [{"index": 0, "id": "A", "function": fn("f", '{"x":')}],
        [{"index": 0, "id": "B", "function": fn("g", '{"y":')}],
        [{"index": 0, "id": "A", "function": fn(arguments="1}")}],
        [{"index": 0, "id": "B", "function": fn(arguments="2}")}],
    )
    calls = run(stream).completion.tool_calls
    assert [("A", "f", '{"x":1}', 0), ("B", "g", '{"y":2}', 0)] == [
        (c.id, c.name, c.arguments, c.index) for c in calls
    ]


def test_a_fragment_without_id_at_a_shared_index_continues_the_call_streamed_last() -> None:
    """At an index several calls share, a fragment with no id joins the call the last
    fragment there went to, whether that call started last or was gone back to by its id."""
    stream = tool_stream(
        [{"index": 0, "id": "A", "function": fn("f", "[1")}],
        [{"index": 0, "id": "B", "function": fn("g", "[2")}],
        [{"index": 0, "function": fn(arguments=",2")}],
        [{"index": 0, "id": "A", "function": fn(arguments=",1")}],
        [{"index": 0, "function": fn(arguments="]")}],
        [{"index": 0, "id": "B", "function": fn(arguments="]")}],
    )
    calls = run(stream).completion.tool_calls
    assert [("A", "[1,1]"), ("B", "[2,2]")] == [(c.id, c.arguments) for c in calls]


def test_a_tool_call_id_that_is_not_a_string_is_no_id() -> None:
    """A list or an object where the id goes is ignored, as a missing id is: the fragment
    continues its call (it raised TypeError, unhashable, looking the id up)."""
    stream = tool_stream(
        [{"index": 0, "id": "a", "function": fn("f", "{")}],
        [{"index": 0, "id": {"x": 1}, "function": fn(arguments='"k":')}],
        [{"id": [1], "function": fn(arguments="1}")}],
    )
    acc = ChatAccumulator()
    deltas = [d for c in acc.feed(stream) for d in c.deltas if isinstance(d, ToolCallDelta)]
    acc.close()
    assert [("a", "f", '{"k":1}')] == [
        (c.id, c.name, c.arguments) for c in acc.completion.tool_calls
    ]
    assert ["a", None, None] == [d.id for d in deltas]


def test_object_arguments_are_serialized_not_dropped() -> None:
    """A gateway that sends arguments as an object still gives a JSON string."""
    stream = tool_stream([{"index": 0, "id": "a", "function": fn("f", {"x": 1})}])
    assert '{"x":1}' == run(stream).completion.tool_calls[0].arguments


def test_tool_call_deltas_are_typed() -> None:
    """Each fragment surfaces as a ToolCallDelta carrying only its own piece."""
    acc = ChatAccumulator()
    chunks = acc.feed(tool_stream([{"index": 0, "id": "a", "function": fn("f", "{")}]))
    assert (ToolCallDelta(0, "a", "f", "{"),) == chunks[0].deltas


# -- the next turn: Completion.to_message ---------------------------------------------------


def test_a_text_answer_becomes_an_assistant_message() -> None:
    """Plain text comes back as role and content, with no empty `tool_calls`."""
    message = run(openai_stream(["Hel", "lo"])).completion.to_message()
    assert {"role": "assistant", "content": "Hello"} == message


def test_tool_calls_become_an_assistant_message_without_content() -> None:
    """Calls and no text: content is None, each call in the API's nested shape, by index."""
    stream = tool_stream(
        [
            {"index": 0, "id": "call_a", "type": "function", "function": fn("get", "")},
            {"index": 1, "id": "call_b", "type": "function", "function": fn("put", "{}")},
        ],
        [{"index": 0, "function": fn(arguments='{"city": "Oslo"}')}],
    )
    expected = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_a",
                "type": "function",
                "function": {"name": "get", "arguments": '{"city": "Oslo"}'},
            },
            {"id": "call_b", "type": "function", "function": {"name": "put", "arguments": "{}"}},
        ],
    }
    assert expected == run(stream).completion.to_message()


def test_text_beside_tool_calls_is_kept() -> None:
    """A model that says something and calls a tool keeps both."""
    stream = chunk({"content": "Checking."}) + tool_stream(
        [{"index": 0, "id": "a", "function": fn("f", "{}")}]
    )
    message = run(stream).completion.to_message()
    assert ("Checking.", 1) == (message["content"], len(message["tool_calls"]))


def test_an_assistant_message_streamed_back_is_the_same_message() -> None:
    """The API's assistant message, streamed as fragments of interleaved calls, comes back out."""
    sent: dict[str, Any] = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}},
            {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": "[2, 3]"}},
        ],
    }
    calls = sent["tool_calls"]
    heads = [
        {
            "index": i,
            "id": call["id"],
            "type": call["type"],
            "function": fn(call["function"]["name"]),
        }
        for i, call in enumerate(calls)
    ]
    pieces = [
        [
            {"index": i, "function": fn(arguments=call["function"]["arguments"][at : at + 3])}
            for i, call in enumerate(calls)
        ]
        for at in range(0, 9, 3)
    ]
    stream = chunk({"role": "assistant", "content": None}) + tool_stream(heads, *pieces)
    assert sent == run(stream).completion.to_message()


def test_a_refusal_goes_back_as_a_refusal() -> None:
    """A refusal is sent back in its own field, with empty content, as the API accepts it."""
    stream = chunk({"refusal": "I can't"}) + chunk({"refusal": " help."}, "stop") + DONE
    expected = {"role": "assistant", "content": "", "refusal": "I can't help."}
    assert expected == run(stream).completion.to_message()


def test_reasoning_is_not_sent_back_with_text() -> None:
    """On a text turn reasoning stays out of the message (DeepSeek ignores it, and refused it
    before its thinking mode)."""
    stream = chunk({"reasoning_content": "hmm"}) + chunk({"content": "42"}, "stop") + DONE
    assert {"role": "assistant", "content": "42"} == run(stream).completion.to_message()


def test_reasoning_goes_back_beside_tool_calls() -> None:
    """DeepSeek's thinking mode answers 400 to a tool loop whose assistant message drops the
    reasoning that led to the calls."""
    call = {"index": 0, "id": "call_1", "type": "function"}
    call["function"] = {"name": "weather", "arguments": "{}"}
    stream = (
        chunk({"reasoning_content": "Need the weather."})
        + chunk({"tool_calls": [call]}, "tool_calls")
        + DONE
    )
    message = run(stream).completion.to_message()
    assert ("Need the weather.", None) == (message["reasoning_content"], message["content"])


def test_to_message_takes_any_choice_by_index() -> None:
    """With `n` > 1, `choice` picks which answer continues the conversation."""
    stream = b"".join(
        [
            choice_chunk(0, "a", "stop"),
            choice_chunk(1, "b", "stop"),
            DONE,
        ]
    )
    completion = run(stream).completion
    assert ["a", "b"] == [completion.to_message(i)["content"] for i in (0, 1)]


def test_to_message_for_a_choice_that_never_came_raises() -> None:
    """Asking for a choice the stream did not have is a mistake, named with what there is."""
    completion = run(openai_stream(["a"])).completion
    with pytest.raises(IndexError, match=r"no choice 2 in this completion \(choices: 0\)"):
        completion.to_message(2)


def test_an_empty_completion_is_an_empty_assistant_message() -> None:
    """Nothing received (a stream cut before any content) still gives a valid message."""
    assert {"role": "assistant", "content": ""} == Completion().to_message()


def test_each_message_is_a_fresh_dict() -> None:
    """Changing one returned message changes neither the completion nor the next one."""
    completion = run(tool_stream([{"index": 0, "id": "a", "function": fn("f", "{}")}])).completion
    first = completion.to_message()
    first["tool_calls"][0]["function"]["arguments"] = "changed"
    assert "{}" == completion.to_message()["tool_calls"][0]["function"]["arguments"]


def test_a_tool_loop_sends_the_calls_back_before_their_results() -> None:
    """Through a client: the next request's history holds the answer as the API wants it."""
    call = {"index": 0, "id": "call_w", "type": "function", "function": fn("weather", "")}
    first = tool_stream([call], [{"index": 0, "function": fn(arguments='{"city": "Oslo"}')}])
    transport = MockTransport(
        [MockResponse(chunks=[first]), MockResponse(chunks=sse_body("Sunny."))]
    )
    client = holysheep.Client(api_key="k", transport=transport)
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Weather in Oslo?"}]
    completion = client.chat.complete(model="gpt-4.1", messages=messages)
    messages.append(completion.to_message())
    for tool_call in completion.tool_calls:
        result = {"city": tool_call.parsed_arguments()["city"], "sky": "clear"}
        messages.append(
            {"role": "tool", "tool_call_id": tool_call.id, "content": json.dumps(result)}
        )
    assert "Sunny." == client.chat.complete(model="gpt-4.1", messages=messages).text
    sent = json.loads(transport.requests[1].content)["messages"]
    assert [
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_w",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_w", "content": '{"city": "Oslo", "sky": "clear"}'},
    ] == sent


def test_numeric_fields_are_never_added() -> None:
    """Cumulative usage on every chunk: the latest wins."""
    stream = chunk({"content": "a"}, usage={"prompt_tokens": 5, "completion_tokens": 1})
    stream += chunk({"content": "b"}, "stop", usage={"prompt_tokens": 5, "completion_tokens": 2})
    assert Usage(5, 2, 7) == run(stream + DONE).completion.usage


def test_anthropic_usage_names_are_understood() -> None:
    """`input_tokens`/`output_tokens` map onto the OpenAI names."""
    assert Usage(3, 4, 7) == Usage.from_dict({"input_tokens": 3, "output_tokens": 4})


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"prompt_tokens": True, "completion_tokens": 2, "total_tokens": 3}, Usage(None, 2, 3)),
        ({"prompt_tokens": 3, "completion_tokens": False}, Usage(3, None, None)),
        ({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": True}, Usage(3, 4, 7)),
        ({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": "7"}, Usage(3, 4, 7)),
    ],
)
def test_a_count_that_is_no_integer_is_unknown(raw: dict[str, object], expected: Usage) -> None:
    """JSON `true` is no count of 1, and a total that is no count is the sum of the two."""
    assert expected == Usage.from_dict(raw)
    streamed = chunk({"content": "a"}, "stop") + chunk(None, choices=[], usage=raw)
    assert expected == run(streamed + DONE).completion.usage


# -- errors -------------------------------------------------------------------------------------


def test_invalid_json_raises_with_the_payload() -> None:
    """Invalid JSON is never skipped: the error names the payload, truncated."""
    acc = ChatAccumulator()
    with pytest.raises(RemoteProtocolError, match=r"invalid JSON.*data: '\{not json'"):
        acc.feed(chunk({"content": "a"}) + b"data: {not json\n\n")
    long = b"data: {" + b"x" * 1000 + b"\n\n"
    with pytest.raises(RemoteProtocolError) as info:
        ChatAccumulator().feed(long)
    assert len(str(info.value)) < 400


def test_non_object_json_raises() -> None:
    """A JSON value that is not an object is not a chunk."""
    with pytest.raises(RemoteProtocolError, match="expected a JSON object"):
        ChatAccumulator().feed(b"data: [1, 2]\n\n")
    with pytest.raises(RemoteProtocolError, match="expected choices to be objects"):
        ChatAccumulator().feed(b'data: {"choices": [1]}\n\n')


def test_inband_openai_error_carries_partial_completion() -> None:
    """`data: {"error": ...}` raises StreamError with what was streamed before it."""
    acc = ChatAccumulator()
    error = {"error": {"message": "Overloaded", "type": "overloaded_error", "code": "overloaded"}}
    with pytest.raises(StreamError) as info:
        acc.feed(
            chunk({"content": "par"})
            + chunk({"content": "tial"})
            + b"data: "
            + json.dumps(error).encode()
            + b"\n\n"
        )
    exc = info.value
    assert ("Overloaded", "overloaded_error", "overloaded", True) == (
        exc.message.split(": ", 1)[1],
        exc.type,
        exc.code,
        exc.retryable,
    )
    assert exc.completion is not None
    assert "partial" == exc.completion.text
    assert "partial completion kept: 7 chars" in str(exc)
    with pytest.raises(LocalProtocolError, match="reported an error"):
        acc.feed(b"data: {}\n\n")


def test_a_null_error_field_is_no_error() -> None:
    """`"error": null` beside an ordinary chunk (some gateways send it on every chunk)."""
    acc = ChatAccumulator()
    data = {"choices": [{"index": 0, "delta": {"content": "hi"}}], "error": None}
    chunks = acc.feed(b"data: " + json.dumps(data).encode() + b"\n\n")
    assert ["hi"] == [c.text for c in chunks]
    assert "hi" == acc.completion.text


@pytest.mark.parametrize("c_part", [True, False], ids=["C", "Python"])
def test_chunks_before_an_error_in_the_same_bytes_go_with_the_error(
    c_part: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """They are accumulated already; the error carries them so the caller can still have them."""
    from holysheep import _chat

    if not c_part:
        monkeypatch.setattr(_chat, "_c_feed", None)
    error = b'data: {"error": {"message": "Overloaded", "type": "overloaded_error"}}\n\n'
    for bad in (error, b"data: {not json\n\n"):
        acc = ChatAccumulator()
        with pytest.raises((StreamError, RemoteProtocolError)) as info:
            acc.feed(chunk({"content": "par"}) + chunk({"content": "tial"}) + bad)
        assert ["par", "tial"] == [c.text for c in info.value.chunks]
        assert "partial" == acc.completion.text
    with pytest.raises(StreamError) as info:
        ChatAccumulator().feed(error)
    assert () == info.value.chunks  # nothing before it


@pytest.mark.parametrize("c_part", [True, False], ids=["C", "Python"])
@pytest.mark.parametrize("split", [False, True], ids=["one read", "a read each"])
def test_nothing_after_done_is_part_of_the_answer(
    c_part: bool, split: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`[DONE]` ends the stream: text, errors and invalid JSON after it are ignored (text
    after it was added to the answer)."""
    from holysheep import _chat

    if not c_part:
        monkeypatch.setattr(_chat, "_c_feed", None)
    after = [
        chunk({"content": " extra"}),
        b'data: {"error": {"message": "late"}}\n\n',
        b"data: {not json\n\n",
        b"event: error\ndata: {}\n\n",
    ]
    reads = [openai_stream(["Hi"]), *after]
    acc = ChatAccumulator()
    chunks = [c for read in reads for c in acc.feed(read)] if split else acc.feed(b"".join(reads))
    acc.close()
    assert ("Hi", "Hi", True) == ("".join(c.text for c in chunks), acc.completion.text, acc.done)


def test_anthropic_error_event() -> None:
    """`event: error` in Anthropic's shape is a StreamError too."""
    data = {"type": "error", "error": {"type": "invalid_request_error", "message": "bad"}}
    with pytest.raises(StreamError) as info:
        ChatAccumulator().feed(b"event: error\ndata: " + json.dumps(data).encode() + b"\n\n")
    assert ("invalid_request_error", False) == (info.value.type, info.value.retryable)


def test_error_event_with_plain_text_data() -> None:
    """A non-JSON error event keeps its text as the message."""
    with pytest.raises(StreamError, match="upstream exploded"):
        ChatAccumulator().feed(b"event: error\ndata: upstream exploded\n\n")


def test_string_error_and_numeric_code() -> None:
    """`{"error": "..."}` and numeric codes are understood."""
    with pytest.raises(StreamError, match="slow down") as info:
        ChatAccumulator().feed(b'data: {"error": "slow down"}\n\n')
    assert not info.value.retryable
    with pytest.raises(StreamError) as info:
        ChatAccumulator().feed(b'data: {"error": {"message": "busy", "code": 529}}\n\n')
    assert (True, 529) == (info.value.retryable, info.value.status_code)


@pytest.mark.parametrize(
    ("type_", "code", "retryable"),
    [
        ("overloaded_error", None, True),
        ("rate_limit_error", None, True),
        (None, "rate_limit_exceeded", True),
        ("server_error", None, True),
        (None, 503, True),
        (None, "429", True),
        ("invalid_request_error", None, False),
        ("authentication_error", "invalid_api_key", False),
        (None, "insufficient_quota", False),
        (None, 400, False),
        (None, None, False),
        (None, "\u00b2", False),  # a digit to str.isdigit(), not to int()
        (None, "\u0664\u0662\u0669", False),  # 429 in Arabic-Indic digits: not an HTTP status
        (None, "9" * 5000, False),  # more digits than int() takes
        (None, "0429", False),  # a status is three digits
    ],
)
def test_retryable_classification(
    type_: str | None, code: str | int | None, retryable: bool
) -> None:
    """Transient classes are retryable; request and auth errors are not."""
    assert retryable == is_retryable_error(type_, code)


@pytest.mark.parametrize("c_part", [True, False], ids=["C", "Python"])
@pytest.mark.parametrize("code", ["\u00b2", "9" * 5000], ids=["superscript two", "5000 digits"])
def test_an_error_code_int_cannot_read_is_still_a_stream_error(
    c_part: bool, code: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's error, whatever its code: StreamError with the chunks before it, and the
    accumulator refuses more, as after any in-band error."""
    from holysheep import _chat

    if not c_part:
        monkeypatch.setattr(_chat, "_c_feed", None)
    acc = ChatAccumulator()
    error = json.dumps({"error": {"message": "boom", "code": code}}).encode()
    with pytest.raises(StreamError) as info:
        acc.feed(chunk({"content": "Hi"}) + b"data: " + error + b"\n\n")
    assert (code, False) == (info.value.code, info.value.retryable)
    assert ["Hi"] == [c.text for c in info.value.chunks]
    with pytest.raises(LocalProtocolError, match="reported an error"):
        acc.feed(chunk({"content": " more"}))


_error_field = st.one_of(
    st.none(),
    st.text(max_size=8),
    st.text(st.characters(categories=["Nd", "No"]), min_size=1, max_size=4),  # any digits
    st.sampled_from(["429", "503", "9" * 4301, "rate_limit_error", "Overloaded_Error"]),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False, allow_infinity=False),  # JSON has neither
    st.booleans(),
)


@settings(max_examples=300)
@given(_error_field, _error_field)
def test_any_inband_error_is_a_stream_error(type_: Any, code: Any) -> None:
    """Whatever the `type` and `code` of an in-band error, feeding it raises StreamError,
    classified, and fails the accumulator."""
    acc = ChatAccumulator()
    error = json.dumps({"error": {"message": "boom", "type": type_, "code": code}})
    with pytest.raises(StreamError) as info:
        acc.feed(b"data: " + error.encode() + b"\n\n")
    expected = is_retryable_error(type_ if isinstance(type_, str) else None, code)
    assert expected == info.value.retryable
    status = info.value.status_code
    assert status is None or (type(status) is int and status == code)  # never `True`
    with pytest.raises(LocalProtocolError):
        acc.feed(DONE)


def test_truncated_stream_raises_with_partial_completion() -> None:
    """No [DONE] and no finish_reason: IncompleteStreamError keeps the text."""
    acc = ChatAccumulator()
    acc.feed(chunk({"content": "half"}) + b'data: {"choices": [{"delta": {"con')
    with pytest.raises(IncompleteStreamError, match="middle of an event") as info:
        acc.close()
    assert info.value.completion is not None
    assert "half" == info.value.completion.text


def test_truncation_check_can_be_turned_off() -> None:
    """`require_end=False` accepts servers that never say they are done."""
    assert "half" == run(chunk({"content": "half"}), require_end=False).completion.text


def test_finish_reason_without_done_is_complete() -> None:
    """Servers that omit [DONE] but send a finish_reason end cleanly."""
    assert "ok" == run(chunk({"content": "ok"}, "stop")).completion.text


def test_cut_after_finish_reason_still_raises() -> None:
    """A stream cut inside the usage chunk lost data: that is reported too."""
    acc = ChatAccumulator()
    acc.feed(chunk({"content": "ok"}, "stop") + b'data: {"usage": {"prompt')
    with pytest.raises(IncompleteStreamError, match="usage may be missing"):
        acc.close()


def choice_chunk(index: int, content: str | None = None, finish: str | None = None) -> bytes:
    """A chunk of one choice of several (`n` > 1)."""
    delta = {} if content is None else {"content": content}
    return chunk(choices=[{"index": index, "delta": delta, "finish_reason": finish}])


def test_a_cut_after_one_of_two_choices_finished_raises() -> None:
    """With `n=2`, choice 0's finish_reason says nothing of choice 1: a body ending in the
    middle of choice 1 is cut short, and the error keeps both choices' text (it was taken
    for a complete answer, choice 1 silently truncated)."""
    acc = ChatAccumulator()
    acc.feed(
        chunk(
            choices=[
                {"index": 0, "delta": {"content": "Yes."}},
                {"index": 1, "delta": {"content": "Well, it "}},
            ]
        )
        + choice_chunk(0, finish="stop")
        + choice_chunk(1, "depends on")
    )
    assert not acc.finished
    with pytest.raises(IncompleteStreamError, match="without a finish_reason for choice 1") as info:
        acc.close()
    assert info.value.completion is not None
    assert [(0, "Yes.", "stop"), (1, "Well, it depends on", None)] == [
        (c.index, c.text, c.finish_reason) for c in info.value.completion.choices
    ]


def test_a_cut_inside_an_event_of_the_last_unfinished_choice_raises() -> None:
    """The same cut in the middle of one of choice 1's events: choice 1 is what was cut (not
    the usage, as after a finish), and the text before it is kept."""
    acc = ChatAccumulator()
    acc.feed(
        choice_chunk(1, "Well, ")
        + choice_chunk(0, "Yes.", "stop")
        + b'data: {"choices": [{"index": 1, "delta": {"content": "it dep'
    )
    with pytest.raises(IncompleteStreamError, match=r"for choice 1 .*middle of an event") as info:
        acc.close()
    assert info.value.completion is not None
    assert ["Yes.", "Well, "] == [c.text for c in info.value.completion.choices]


def test_several_choices_without_done_are_complete_once_each_finished() -> None:
    """A server that omits [DONE] ends well when every choice has its finish_reason, in
    whatever order they finish; a choice first seen after the others finished is waited for."""
    acc = ChatAccumulator()
    finished = []
    for event in [
        choice_chunk(1, "x"),
        choice_chunk(1, finish="length"),
        choice_chunk(0, "a", "stop"),
        choice_chunk(2, "z"),
        choice_chunk(2, finish="stop"),
    ]:
        acc.feed(event)
        finished.append(acc.finished)
    acc.close()
    assert [False, True, True, False, True] == finished
    assert [("a", "stop"), ("x", "length"), ("z", "stop")] == [
        (c.text, c.finish_reason) for c in acc.completion.choices
    ]


def test_choices_asked_for_that_never_started_keep_the_stream_unfinished() -> None:
    """`n=3` from a gateway that streams the choices one after another: a body ending after
    choices 0 and 1 finished, before choice 2 began, is cut short (it was taken for a complete
    answer with two choices), and the error says how many never came."""
    acc = ChatAccumulator(choices=3)
    finished = []
    for event in [choice_chunk(0, "a"), choice_chunk(0, finish="stop"), choice_chunk(1, "b")]:
        acc.feed(event)
        finished.append(acc.finished)
    acc.feed(choice_chunk(1, finish="stop"))
    assert [False, False, False, False] == [*finished, acc.finished]
    with pytest.raises(IncompleteStreamError, match="1 of the 3 choices asked for") as info:
        acc.close()
    assert info.value.completion is not None
    assert ["a", "b"] == [c.text for c in info.value.completion.choices]
    assert "[partial completion kept: 2 chars]" in str(info.value)  # both choices counted


def test_choices_asked_for_all_finished_without_done_end_well() -> None:
    """Once each of the `n` choices finished, a body without [DONE] ends well, as for one."""
    acc = ChatAccumulator(choices=2)
    acc.feed(choice_chunk(1, "x", "stop"))
    assert not acc.finished
    acc.feed(choice_chunk(0, "y", "length"))
    assert acc.finished
    assert [] == acc.close()
    assert [("y", "length"), ("x", "stop")] == [
        (c.text, c.finish_reason) for c in acc.completion.choices
    ]


@pytest.mark.parametrize("bad", [0, -1, "2", 2.0, True, None])
def test_choices_must_be_a_positive_int(bad: object) -> None:
    with pytest.raises(ValueError, match="choices must be a positive int"):
        ChatAccumulator(choices=bad)  # type: ignore[arg-type]


def test_choices_never_started_are_named_beside_an_unfinished_one() -> None:
    acc = ChatAccumulator(choices=4)
    acc.feed(choice_chunk(0, "a", "stop") + choice_chunk(1, "b"))
    with pytest.raises(
        IncompleteStreamError,
        match=r"without a finish_reason for choice 1, and 2 of the 4 choices asked for \(n\)",
    ):
        acc.close()


def test_usage_to_dict_has_the_openai_names_whatever_the_server_used() -> None:
    """Anthropic's names are read as OpenAI's (the total computed), and come out as OpenAI's;
    details stay on `raw`, and each call gives a dict of the caller's own."""
    usage = Usage.from_dict({"input_tokens": 3, "output_tokens": 4, "cache_read_input_tokens": 2})
    assert {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7} == usage.to_dict()
    usage.to_dict()["prompt_tokens"] = 0
    assert 3 == usage.to_dict()["prompt_tokens"]
    assert {"prompt_tokens": None, "completion_tokens": None, "total_tokens": None} == (
        Usage().to_dict()
    )


def test_use_after_close() -> None:
    """Feeding a closed accumulator is a caller bug; closing twice is fine."""
    acc = run(openai_stream(["a"]))
    assert [] == acc.close()
    with pytest.raises(LocalProtocolError, match="after close"):
        acc.feed_event(ServerSentEvent(data="{}"))


def test_completion_snapshots_are_independent() -> None:
    """A snapshot taken mid-stream does not change as more text arrives."""
    acc = ChatAccumulator()
    acc.feed(chunk({"content": "a"}))
    early = acc.completion
    acc.feed(chunk({"content": "b"}))
    assert ("a", "ab") == (early.text, acc.completion.text)
    assert acc.completion == acc.completion


def test_accumulation_memory_is_linear_in_text() -> None:
    """20,000 chunks of 4 characters keep ~that much text, not the chunks."""
    one = chunk({"content": "abcd"})
    acc = ChatAccumulator()
    tracemalloc.start()
    try:
        for _ in range(20_000):
            acc.feed(one)
        text = acc.completion.text
        current, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert 80_000 == len(text)
    # The joined text (80 KB) plus the last chunk; far below keeping 20k dicts (~20 MB).
    assert current < 1_000_000


# -- properties --------------------------------------------------------------------------------


@st.composite
def parallel_calls(draw: st.DrawFn) -> tuple[list[int | None], list[list[dict[str, Any]]]]:
    """Parallel calls, some numbered by the server and some not, as fragment lists (a chunk
    each): every call's first fragment (id, name, "[k"), in any order, then its last ("]"),
    found by index when it has one, else by id, in any order. Or, as some gateways send
    them, every numbered call at index 0 with its id on every fragment, interleaved."""
    n = draw(st.integers(min_value=1, max_value=5))
    indices = draw(st.lists(st.integers(min_value=0, max_value=6), min_size=n, max_size=n))
    numbered = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    shared = draw(st.booleans())
    index = [
        (0 if shared else i) if keep and (shared or i not in indices[:k]) else None
        for k, (i, keep) in enumerate(zip(indices, numbered, strict=True))
    ]
    fragments = []
    for k in draw(st.permutations(range(n))):
        where = {"id": f"call_{k}"} if index[k] is None else {"index": index[k], "id": f"call_{k}"}
        fragments.append({**where, "function": fn(f"f{k}", f"[{k}")})
    for k in draw(st.permutations(range(n))):
        if index[k] is None:
            where: dict[str, Any] = {"id": f"call_{k}"}
        else:
            where = {"index": index[k], "id": f"call_{k}"} if shared else {"index": index[k]}
        fragments.append({**where, "function": fn(arguments="]")})
    size = draw(st.integers(min_value=1, max_value=3))
    return index, [fragments[i : i + size] for i in range(0, len(fragments), size)]


@given(parallel_calls())
def test_parallel_fragments_join_their_own_call(
    case: tuple[list[int | None], list[list[dict[str, Any]]]],
) -> None:
    """Numbered or not, arriving in any order, each fragment joins the call it belongs to, and
    the calls are listed by index."""
    index, chunks = case
    calls = run(tool_stream(*chunks)).completion.tool_calls
    assert sorted(c.index for c in calls) == [c.index for c in calls]
    assert {f"call_{k}": f"[{k}]" for k in range(len(index))} == {c.id: c.arguments for c in calls}
    assert len(index) == len(calls)
    numbered = {f"call_{k}": i for k, i in enumerate(index) if i is not None}
    assert numbered == {c.id: c.index for c in calls if c.id in numbered}  # the server's own


tokens_strategy = st.lists(st.text(min_size=1, max_size=8), max_size=30)


@given(tokens_strategy, st.lists(st.integers(min_value=0, max_value=5000), max_size=15))
def test_any_split_gives_the_same_completion(tokens: list[str], cuts: list[int]) -> None:
    """However the bytes are cut, the accumulated text is exactly the tokens joined."""
    stream = openai_stream(tokens)
    acc = ChatAccumulator()
    start = 0
    for cut in [*sorted(c for c in cuts if c <= len(stream)), len(stream)]:
        acc.feed(stream[start:cut])
        start = cut
    acc.close()
    assert "".join(tokens) == acc.completion.text


@st.composite
def several_choices(draw: st.DrawFn) -> list[bytes]:
    """The events of `n` choices streamed together without [DONE] (each its tokens, then its
    finish chunk), interleaved in any order."""
    tokens = draw(st.lists(st.lists(st.text(min_size=1, max_size=4), max_size=3), min_size=1))
    queues = [[(i, t) for t in texts] + [(i, None)] for i, texts in enumerate(tokens)]
    events = []
    while any(queues):
        queue = draw(st.sampled_from([q for q in queues if q]))
        index, text = queue.pop(0)
        events.append((index, text))
    return [choice_chunk(i, t) if t is not None else choice_chunk(i, "", "stop") for i, t in events]


@given(several_choices(), st.data())
def test_several_choices_cut_anywhere_are_complete_only_when_each_seen_finished(
    events: list[bytes], data: st.DataObject
) -> None:
    """Cut after any event, or inside the next one: close() accepts the stream only if every
    choice that arrived has its finish_reason, as many arrived as were asked for (`n`), and no
    event was cut; otherwise it raises with the text of every choice so far."""
    kept = data.draw(st.integers(min_value=0, max_value=len(events)), label="events kept")
    body = b"".join(events[:kept])
    cut = b""
    if kept < len(events):
        cut = events[kept][: data.draw(st.integers(0, len(events[kept]) - 1), label="cut")]
    expected = run(body, require_end=False).completion
    asked = data.draw(st.integers(1, len(events)), label="n asked for")
    acc = ChatAccumulator(choices=asked)
    acc.feed(body + cut)
    every = len(expected.choices) >= asked
    assert acc.finished == (every and all(c.finish_reason for c in expected.choices))
    if every and expected.choices and all(c.finish_reason for c in expected.choices) and not cut:
        acc.close()
        assert expected == acc.completion
    else:
        with pytest.raises(IncompleteStreamError) as info:
            acc.close()
        assert expected == info.value.completion


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "choices",
                    "delta",
                    "content",
                    "index",
                    "tool_calls",
                    "function",
                    "id",
                    "name",
                    "arguments",
                    "usage",
                    "finish_reason",
                    "error",
                    "role",
                ]
            ),
            children,
            max_size=4,
        )
    ),
    max_leaves=12,
)


@given(st.lists(json_values, max_size=5))
def test_arbitrary_json_yields_chunks_or_our_errors(values: list[Any]) -> None:
    """Any JSON, however odd its shape, gives chunks or a HolySheep error, never a crash."""
    acc = ChatAccumulator(require_end=False)
    try:
        for value in values:
            acc.feed(b"data: " + json.dumps(value).encode() + b"\n\n")
        acc.close()
        assert isinstance(acc.completion.text, str)
    except (RemoteProtocolError, StreamError):
        pass


@given(
    st.lists(st.text(min_size=1, max_size=6), max_size=60),
    st.sets(st.integers(min_value=0, max_value=60), max_size=5),
)
def test_text_is_every_delta_in_order_with_snapshots_taken_anywhere(
    tokens: list[str], snapshot_after: set[int]
) -> None:
    """Content is joined in blocks as it arrives; whatever the count of deltas and wherever a
    partial completion is taken, the text is exactly the deltas so far, in order."""
    acc = ChatAccumulator()
    acc.feed(chunk({"role": "assistant", "content": ""}))
    for i, token in enumerate(tokens):
        if i in snapshot_after:
            assert "".join(tokens[:i]) == acc.completion.text
        acc.feed(chunk({"content": token}))
    acc.feed(chunk(finish="stop") + DONE)
    acc.close()
    assert "".join(tokens) == acc.completion.text
    assert "".join(tokens) == acc.completion.text  # a second snapshot is the same


def test_raw_is_the_chunk_json_parsed_when_read() -> None:
    """`chunk.raw` reads like the parsed JSON (a mapping), and `id` and `model` come from it."""
    acc = ChatAccumulator()
    (first,) = acc.feed(chunk({"role": "assistant", "content": "Hi"}, x_extra=[1, 2]))
    expected = json.loads(chunk({"role": "assistant", "content": "Hi"}, x_extra=[1, 2])[6:])
    assert expected == dict(first.raw)
    assert [1, 2] == first.raw["x_extra"]
    assert len(expected) == len(first.raw)
    assert "x_extra" in first.raw
    assert ("chatcmpl-1", "gpt-4.1") == (first.id, first.model)


def test_raw_reads_like_the_parsed_json_in_a_repr() -> None:
    """`repr(chunk.raw)` is that of the parsed dict, not of a lazy wrapper hiding it."""
    acc = ChatAccumulator()
    (first,) = acc.feed(chunk({"content": "Hi"}))
    assert repr(json.loads(chunk({"content": "Hi"})[6:])) == repr(first.raw)
