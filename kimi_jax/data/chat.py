"""Kimi K2's chat format: conversations -> prompt tokens, and generated tool-call sections -> calls. S tokens.

A conversation renders as Kimi-K2-Instruct's chat template does:

    [<|im_system|>tool_declare<|im_middle|>{tools as compact JSON}<|im_end|>]          only when tools are given
    [<|im_system|>system<|im_middle|>You are Kimi, ...<|im_end|>]                     unless messages[0] is system
    <|im_{user|assistant|system}|>{name or role}<|im_middle|>{content}<|im_end|>      per message (tool -> system)
    <|im_assistant|>assistant<|im_middle|>                                           the generation prompt

and the model stops on <|im_end|>. An assistant message with tool calls renders its content, then

    <|tool_calls_section_begin|><|tool_call_begin|>functions.{name}:{index}<|tool_call_argument_begin|>{JSON}
    <|tool_call_end|>...<|tool_calls_section_end|>

and a tool result renders as `## Return of {tool_call_id}\n{content}` in a turn named after the tool.

`encode_chat` emits the markers as special ids and encodes everything else as ordinary text, so message content
that spells a marker ("<|im_end|>") cannot forge one. Messages are OpenAI-style dicts: role, content (a string,
None or a list of {"type": "text", "text": ...} parts), optional name, tool_calls
[{"id"?, "function": {"name", "arguments": dict | JSON string}}] and, for tool results, tool_call_id.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import json
import re
from typing import Any

from kimi_jax.data.tokenizer import KimiTokenizer

DEFAULT_SYSTEM_PROMPT = "You are Kimi, an AI assistant created by Moonshot AI."
STOP_TOKEN = "<|im_end|>"  # generation stops here

IM_SYSTEM, IM_USER, IM_ASSISTANT = "<|im_system|>", "<|im_user|>", "<|im_assistant|>"
IM_MIDDLE, IM_END = "<|im_middle|>", STOP_TOKEN
SECTION_BEGIN, SECTION_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CALL_BEGIN, ARGUMENT_BEGIN, CALL_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
_ROLE_MARKERS = {"system": IM_SYSTEM, "user": IM_USER, "assistant": IM_ASSISTANT, "tool": IM_SYSTEM}
_CALL_ID = re.compile(r"functions\.(?P<name>[^\s:]+):(?P<index>\d+)")

Segment = tuple[bool, str]  # (is a special token, text or special token name)


class ToolCallParseError(ValueError):
  """A malformed tool-calls section in generated text."""


def chat_segments(
  messages: Sequence[Mapping[str, Any]],
  tools: Sequence[Mapping[str, Any]] | None = None,
  add_generation_prompt: bool = True,
) -> list[Segment]:
  """The conversation as alternating special tokens and text runs (adjacent text merged)."""
  if not messages:
    raise ValueError("messages is empty")
  segments: list[Segment] = []
  if tools:
    segments += _turn(
      IM_SYSTEM, "tool_declare", [(False, json.dumps(list(tools), ensure_ascii=False, separators=(",", ":")))]
    )
  if messages[0].get("role") != "system":
    segments += _turn(IM_SYSTEM, "system", [(False, DEFAULT_SYSTEM_PROMPT)])
  for i, message in enumerate(messages):
    segments += _message(message, f"messages[{i}]")
  if add_generation_prompt:
    segments += [(True, IM_ASSISTANT), (False, "assistant"), (True, IM_MIDDLE)]
  return _merge_text(segments)


def render_chat(
  messages: Sequence[Mapping[str, Any]],
  tools: Sequence[Mapping[str, Any]] | None = None,
  add_generation_prompt: bool = True,
) -> str:
  """The conversation as template text (markers spelled out)."""
  return "".join(text for _, text in chat_segments(messages, tools, add_generation_prompt))


def encode_chat(
  tokenizer: KimiTokenizer,
  messages: Sequence[Mapping[str, Any]],
  tools: Sequence[Mapping[str, Any]] | None = None,
  add_generation_prompt: bool = True,
) -> list[int]:
  """The conversation as token ids: [S]. Ends with the generation prompt unless add_generation_prompt=False."""
  ids: list[int] = []
  for special, text in chat_segments(messages, tools, add_generation_prompt):
    ids += [tokenizer.special_id(text)] if special else tokenizer.encode(text)
  return ids


def parse_tool_calls(text: str) -> list[dict[str, Any]]:
  """Generated assistant text (special tokens spelled out) -> [{"name", "index", "arguments": dict}, ...].

  Returns [] when the text has no tool-calls section; raises ToolCallParseError on a malformed one.
  """
  begin = text.find(SECTION_BEGIN)
  if begin < 0:
    for marker in (SECTION_END, CALL_BEGIN, ARGUMENT_BEGIN, CALL_END):
      if marker in text:
        raise ToolCallParseError(f"{marker} outside a tool-calls section (no {SECTION_BEGIN})")
    return []
  end = text.find(SECTION_END, begin)
  if end < 0:
    raise ToolCallParseError(f"the tool-calls section is not closed by {SECTION_END} (was the output cut off?)")
  if SECTION_BEGIN in text[end:]:
    raise ToolCallParseError("more than one tool-calls section")
  rest = text[begin + len(SECTION_BEGIN) : end].strip()
  if not rest:
    raise ToolCallParseError("the tool-calls section holds no tool call")
  calls = []
  while rest:
    call, rest = _parse_call(rest, len(calls))
    calls.append(call)
    rest = rest.strip()
  return calls


def _turn(marker: str, name: str, body: list[Segment]) -> list[Segment]:
  return [(True, marker), (False, name), (True, IM_MIDDLE), *body, (True, IM_END)]


def _message(message: Mapping[str, Any], where: str) -> list[Segment]:
  role = message.get("role")
  if role not in _ROLE_MARKERS:
    raise ValueError(f"{where}: role {role!r} is not one of {sorted(_ROLE_MARKERS)}")
  content = _content_text(message.get("content"), where)
  if role == "assistant" and message.get("tool_calls"):
    body = [(False, content), (True, SECTION_BEGIN)]
    for j, call in enumerate(message["tool_calls"]):
      call_id, arguments = _call_fields(call, j, f"{where}.tool_calls[{j}]")
      body += [(True, CALL_BEGIN), (False, call_id), (True, ARGUMENT_BEGIN), (False, arguments), (True, CALL_END)]
    body.append((True, SECTION_END))
  elif role == "tool":
    if "tool_call_id" not in message:
      raise ValueError(f"{where}: a tool message needs the tool_call_id of the call it answers")
    body = [(False, f"## Return of {message['tool_call_id']}\n{content}")]
  else:
    body = [(False, content)]
  return _turn(_ROLE_MARKERS[role], message.get("name") or role, body)


def _content_text(content: Any, where: str) -> str:
  if content is None or isinstance(content, str):
    return content or ""
  parts = []
  for j, part in enumerate(content):
    if part.get("type") != "text":
      raise ValueError(f"{where}.content[{j}]: only text parts are supported, got type {part.get('type')!r}")
    parts.append(part["text"])
  return "".join(parts)


def _call_fields(call: Mapping[str, Any], index: int, where: str) -> tuple[str, str]:
  """An OpenAI-style tool call -> (its id, default functions.{name}:{index}; its arguments as JSON text)."""
  function = call.get("function")
  if not isinstance(function, Mapping) or not function.get("name"):
    raise ValueError(f"{where}: expected {{'function': {{'name': ..., 'arguments': ...}}}}, got {call!r}")
  arguments = function.get("arguments", {})
  if not isinstance(arguments, str):
    arguments = json.dumps(arguments, ensure_ascii=False)
  return call.get("id") or f"functions.{function['name']}:{index}", arguments


def _parse_call(text: str, n: int) -> tuple[dict[str, Any], str]:
  """Parses the tool call that `text` starts with -> (call, the text after it)."""
  if not text.startswith(CALL_BEGIN):
    raise ToolCallParseError(f"tool call {n}: expected {CALL_BEGIN}, found {text[:60]!r}")
  end = text.find(CALL_END)
  if end < 0:
    raise ToolCallParseError(f"tool call {n} is not closed by {CALL_END}")
  body = text[len(CALL_BEGIN) : end]
  header, sep, arguments = body.partition(ARGUMENT_BEGIN)
  if not sep:
    raise ToolCallParseError(f"tool call {n} has no {ARGUMENT_BEGIN}: {body[:60]!r}")
  for marker in (CALL_BEGIN, ARGUMENT_BEGIN):
    if marker in arguments or marker in header:
      raise ToolCallParseError(f"tool call {n} holds a second {marker} before {CALL_END}")
  match = _CALL_ID.fullmatch(header.strip())
  if match is None:
    raise ToolCallParseError(f"tool call {n}: id {header.strip()!r} is not of the form functions.NAME:INDEX")
  try:
    parsed = json.loads(arguments)
  except json.JSONDecodeError as e:
    raise ToolCallParseError(
      f"tool call {n} ({header.strip()}): arguments are not valid JSON ({e.msg} at "
      f"character {e.pos}): {arguments.strip()[:80]!r}"
    ) from e
  if not isinstance(parsed, dict):
    raise ToolCallParseError(
      f"tool call {n} ({header.strip()}): arguments must be a JSON object, got {type(parsed).__name__}"
    )
  call = {"name": match["name"], "index": int(match["index"]), "arguments": parsed}
  return call, text[end + len(CALL_END) :]


def _merge_text(segments: list[Segment]) -> list[Segment]:
  """Joins adjacent text runs and drops empty ones, so each run is tokenized as one piece."""
  merged: list[Segment] = []
  for special, text in segments:
    if not special and merged and not merged[-1][0]:
      merged[-1] = (False, merged[-1][1] + text)
    elif special or text:
      merged.append((special, text))
  return merged
