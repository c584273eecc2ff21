"""OpenAI tools on chat completions: the tools into the prompt, tool calls out of the text.

Three output formats, picked by `--tool-call-parser` or detected from the chat template:

* `hermes`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call (Qwen2.5,
  Hermes, and the default model SmolLM2, whose blocks may hold a list of calls);
* `llama3_json`: a bare `{"name": ..., "parameters": {...}}` object (Llama 3.1 / 3.2), calls
  separated by `;`, optionally after `<|python_tag|>`;
* `mistral`: `[TOOL_CALLS]` then a JSON list of `{"name": ..., "arguments": {...}}`.

`tool_choice` `auto` parses whatever the model wrote; `required` and a named function constrain
the output with a grammar in the parser's format (server/api/structured_output.py), so the
arguments validate against the function's `parameters` schema. A template that has no tools
section gets `DEFAULT_TOOL_PROMPT` as (part of) its system message.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from fusionserve.server.api.protocol import ProtocolError
from fusionserve.server.api.structured_output import JSON_LAYOUT

PARSERS = ("hermes", "llama3_json", "mistral")
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

DEFAULT_TOOL_PROMPT = (
    "You can call functions. These are available, as JSON schemas:\n{tools}\n"
    "To call one, answer only with {example} (one per call); otherwise answer normally."
)
_EXAMPLES = {
    "hermes": '<tool_call>{"name": <function-name>, "arguments": <arguments-object>}</tool_call>',
    "llama3_json": '{"name": <function-name>, "parameters": <arguments-object>}',
    "mistral": '[TOOL_CALLS][{"name": <function-name>, "arguments": <arguments-object>}]',
}


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]

    def openai(self) -> dict[str, Any]:
        fn = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": fn}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str

    def openai(self, index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "type": "function"}
        if index is not None:
            out = {"index": index, **out}
        out["function"] = {"name": self.name, "arguments": self.arguments}
        return out


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def _bad(message: str, param: str) -> ProtocolError:
    return ProtocolError(message, param=param, code="invalid_value")


def detect_parser(chat_template: str | None) -> str:
    """The output format a model's chat template teaches it (hermes when it says nothing)."""
    t = chat_template or ""
    if "[TOOL_CALLS]" in t:
        return "mistral"
    if "<|python_tag|>" in t or ("ipython" in t and "parameters" in t):
        return "llama3_json"
    return "hermes"


def parse_tools(raw: list[dict[str, Any]] | None) -> list[Tool]:
    """OpenAI `tools` → Tool records; each shape error is a 400 naming its place."""
    tools: list[Tool] = []
    for i, t in enumerate(raw or []):
        where = f"tools[{i}]"
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
            raise _bad(f"{where} must be {{'type': 'function', 'function': {{...}}}}", where)
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise _bad(f"{where}.function.name must match [A-Za-z0-9_-]{{1,64}}", f"{where}.function.name")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise _bad(
                f"{where}.function.parameters must be a JSON schema object", f"{where}.function.parameters"
            )
        if name in {x.name for x in tools}:
            raise _bad(f"{where}: duplicate function name {name!r}", f"{where}.function.name")
        tools.append(Tool(name, str(fn.get("description") or ""), params))
    return tools


def resolve_choice(choice: Any, tools: list[Tool]) -> str:
    """`none`, `auto`, `required` or the name of the one function the model must call."""
    if choice is None:
        return "auto" if tools else "none"
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise _bad("tool_choice must be none, auto, required or a named function", "tool_choice")
        if choice != "none" and not tools:
            raise _bad(f"tool_choice {choice!r} needs tools", "tool_choice")
        return choice
    name = (choice.get("function") or {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(name, str):
        raise _bad("a named tool_choice is {'type': 'function', 'function': {'name': ...}}", "tool_choice")
    if name not in {t.name for t in tools}:
        raise _bad(f"tool_choice names {name!r}, which is not in tools", "tool_choice")
    return name


# -- the prompt ----------------------------------------------------------------------------------


def _call_text(parser: str, calls: list[dict[str, Any]]) -> str:
    """An assistant message's tool_calls written the way the model would have written them."""
    objs = []
    for c in calls:
        fn = c.get("function") or {}
        args = fn.get("arguments") or "{}"
        try:
            args_obj = json.loads(args) if isinstance(args, str) else args
        except json.JSONDecodeError:
            args_obj = {}
        key = "parameters" if parser == "llama3_json" else "arguments"
        objs.append({"name": fn.get("name"), key: args_obj})
    if parser == "mistral":
        return "[TOOL_CALLS]" + json.dumps(objs)
    if parser == "llama3_json":
        return "; ".join(json.dumps(o) for o in objs)
    return "\n".join(f"<tool_call>{json.dumps(o)}</tool_call>" for o in objs)


def template_messages(
    messages: list[dict[str, Any]], tools: list[Tool], parser: str, template: str | None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(messages, extra template variables). A template that knows tools gets them as `tools` and
    the messages as they are; one that does not gets the default tool prompt in its system message,
    assistant tool calls as text and tool results as `<tool_response>` user turns."""
    knows_tools = "tools" in (template or "")
    if knows_tools:
        return messages, ({"tools": [t.openai() for t in tools]} if tools else {})
    out: list[dict[str, Any]] = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            text = _call_text(parser, m["tool_calls"])
            content = (m.get("content") or "") + ("\n" if m.get("content") else "") + text
            out.append({"role": "assistant", "content": content})
        elif m["role"] == "tool":
            out.append(
                {"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"}
            )
        else:
            out.append({k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id")})
    if tools:
        listing = "\n".join(json.dumps(t.openai()["function"]) for t in tools)
        prompt = DEFAULT_TOOL_PROMPT.format(tools=listing, example=_EXAMPLES[parser])
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{prompt}".lstrip()}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, {}


# -- the grammar of required / named calls -------------------------------------------------------


def _call_schema(tool: Tool, parser: str) -> dict[str, Any]:
    key = "parameters" if parser == "llama3_json" else "arguments"
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, key: tool.parameters},
        "required": ["name", key],
        "additionalProperties": False,
    }


def tool_grammar(tools: list[Tool], choice: str, parallel: bool, parser: str) -> str:
    """A Lark grammar (llguidance) that admits only well-formed calls of the chosen function(s)."""
    import llguidance

    chosen = [t for t in tools if choice == "required" or t.name == choice]
    schemas = [_call_schema(t, parser) for t in chosen]
    one = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    many = parallel and choice == "required"
    if parser == "mistral":
        arr = {"type": "array", "items": one, "minItems": 1, **({} if many else {"maxItems": 1})}
        arr["x-guidance"] = JSON_LAYOUT
        lark = f'start: "[TOOL_CALLS]" calls\ncalls: %json {json.dumps(arr)}'
    else:
        one = {**one, "x-guidance": JSON_LAYOUT}
        if parser == "hermes":
            call = f'call: "<tool_call>" obj "</tool_call>"\nobj: %json {json.dumps(one)}'
            sep = '"\\n"'
        else:
            call = f"call: obj\nobj: %json {json.dumps(one)}"
            sep = '"; "'
        lark = f"start: call ({sep} call)*\n{call}" if many else f"start: call\n{call}"
    return llguidance.LLMatcher.grammar_from_lark(lark)


# -- parsing the output --------------------------------------------------------------------------

_MARKERS = {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]", "llama3_json": "{"}


def _as_calls(obj: Any, parser: str) -> list[ToolCall] | None:
    items = obj if isinstance(obj, list) else [obj]
    key = "parameters" if parser == "llama3_json" else "arguments"
    calls = []
    for it in items:
        if not isinstance(it, dict) or not isinstance(it.get("name"), str):
            return None
        args = it.get(key, it.get("arguments", it.get("parameters", {})))
        calls.append(ToolCall(it["name"], json.dumps(args, ensure_ascii=False), new_call_id()))
    return calls


def parse_tool_calls(text: str, parser: str, names: set[str]) -> tuple[str | None, list[ToolCall]]:
    """(content before the calls or None, the calls of known functions). Text that does not parse
    as calls stays content: a model that answers in prose is not an error."""
    if parser == "hermes":
        blocks = re.findall(r"<tool_call>(.*?)(?:</tool_call>|$)", text, flags=re.S)
        start = text.find("<tool_call>")
        parts = blocks
    elif parser == "mistral":
        start = text.find("[TOOL_CALLS]")
        parts = [text[start + len("[TOOL_CALLS]") :]] if start >= 0 else []
    else:
        body = text.strip().removeprefix("<|python_tag|>").strip()
        start = 0 if body.startswith("{") else -1
        parts = [p for p in re.split(r"\}\s*;\s*\{", body)] if start == 0 else []
        if len(parts) > 1:
            parts = [p if i == 0 else "{" + p for i, p in enumerate(parts)]
            parts = [p if i == len(parts) - 1 else p + "}" for i, p in enumerate(parts)]
    if start < 0:
        return text, []
    calls: list[ToolCall] = []
    for part in parts:
        try:
            got = _as_calls(json.loads(part.strip()), parser)
        except json.JSONDecodeError:
            got = None
        if not got:
            return text, []
        calls += [c for c in got if c.name in names]  # a made-up function is not called (nor streamed)
    if not calls:
        return text, []
    content = text[:start].strip() if parser != "llama3_json" else ""
    return (content or None), calls


_CALL_HEAD = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')


class StreamedToolCalls:
    """Streams content until a tool-call marker appears; from there, tool-call deltas as OpenAI
    sends them: each call's index, id, type and name once its name is complete, then its arguments
    in pieces as they are written (the raw JSON text of the value, so the pieces concatenate to it).

    A call written with its arguments before its name, or in a shape the scanner does not follow,
    is sent whole when the output ends (parse_tool_calls decides then)."""

    def __init__(self, parser: str, names: set[str]) -> None:
        self.parser, self.names = parser, names
        self.marker = _MARKERS[parser]
        self.text = ""
        self.sent = 0  # characters of `text` streamed as content; the call region starts here
        self.in_call = False
        self.decided = False  # llama3_json: whether the answer is a call or prose
        self.calls: list[dict[str, Any]] = []  # streamed calls: id, name, value_start, emitted, done
        self.scan = 0  # region offset where the next call head is searched

    def feed(self, delta: str) -> tuple[str, list[dict[str, Any]]]:
        """(content safe to stream now, tool-call deltas)."""
        self.text += delta
        if not self.in_call:
            content = self._feed_json() if self.parser == "llama3_json" else self._feed_marked()
            if not self.in_call:
                return content, []
            return content, self._scan_calls()
        return "", self._scan_calls()

    def _feed_marked(self) -> str:
        at = self.text.find(self.marker, self.sent)
        if at >= 0:
            self.in_call = True
            out, self.sent = self.text[self.sent : at], at
            return out
        end = len(self.text) - _partial_suffix(self.text, self.marker)
        out, self.sent = self.text[self.sent : end], max(self.sent, end)
        return out

    def _feed_json(self) -> str:
        """llama3_json: a call is the whole answer, so the first visible characters decide."""
        if not self.decided:
            head = self.text.lstrip()
            tag = "<|python_tag|>"
            if not head or (tag.startswith(head) and head != tag):
                return ""  # undecided: hold whitespace and a partial tag
            self.decided = True
            if head.removeprefix(tag).lstrip().startswith("{") or head.startswith(tag):
                self.in_call = True
                return ""
        out, self.sent = self.text[self.sent :], len(self.text)
        return out

    def _scan_calls(self) -> list[dict[str, Any]]:
        region, deltas = self.text[self.sent :], []
        while True:
            cur = self.calls[-1] if self.calls and not self.calls[-1]["done"] else None
            if cur is None:
                m = _CALL_HEAD.search(region, self.scan)
                if m is None or m.group(1) not in self.names:
                    return deltas
                cur = {
                    "id": new_call_id(),
                    "name": m.group(1),
                    "start": m.end(),
                    "emitted": m.end(),
                    "done": False,
                }
                self.calls.append(cur)
                head = {"index": len(self.calls) - 1, "id": cur["id"], "type": "function"}
                deltas.append({**head, "function": {"name": cur["name"], "arguments": ""}})
            end, complete = _json_value_end(region, cur["start"])
            if end > cur["emitted"]:
                piece = region[cur["emitted"] : end]
                deltas.append({"index": len(self.calls) - 1, "function": {"arguments": piece}})
                cur["emitted"] = end
            if not complete:
                return deltas
            cur["done"], self.scan = True, end

    def finish(self) -> tuple[str, list[dict[str, Any]], bool]:
        """(content still to stream, the remaining tool-call deltas, whether the answer called any).
        The whole text is parsed once more: calls the scanner did not stream are sent whole."""
        if not self.in_call:
            rest, self.sent = self.text[self.sent :], len(self.text)
            return rest, [], False
        _, calls = parse_tool_calls(self.text[self.sent :], self.parser, self.names)
        if not calls and not self.calls:
            return self.text[self.sent :], [], False
        deltas = [c.openai(i) for i, c in enumerate(calls) if i >= len(self.calls)]
        return "", deltas, True


def _json_value_end(text: str, start: int) -> tuple[int, bool]:
    """(end of the JSON value that starts at `start` as far as `text` holds it, whether complete).
    Strings and escapes are followed; a container ends when its brackets balance, a scalar at the
    next delimiter."""
    depth, in_str, esc, i = 0, False, False, start
    while i < len(text):
        ch = text[i]
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
                if depth == 0:
                    return i + 1, True
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            if depth == 0:
                return i, True  # a scalar value ended by its object's closing brace
            depth -= 1
            if depth == 0:
                return i + 1, True
        elif ch == "," and depth == 0:
            return i, True
        i += 1
    return len(text), False


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of marker."""
    for k in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0
