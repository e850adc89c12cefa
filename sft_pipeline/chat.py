"""Conversations: reading them from the shapes users have, rendering them with a chat template, and which tokens
train.

A conversation is a list of ``{"role": "system" | "user" | "assistant", "content": str}``. Files hold it either as
a messages list (OpenAI ``messages``, ShareGPT ``conversations`` with ``from``/``value``; keys and role names are
configurable) or as prompt/response columns (an optional system column; alpaca's instruction + input + output, the
input joined to the instruction by a stated separator).

The loss mask comes from the chat template itself, not from a per-model rule: for every assistant turn i, the
conversation up to turn i rendered with ``add_generation_prompt=True`` must be a prefix of the whole rendering, and so
must the conversation through turn i; the characters between the two are that turn's answer, and the tokens inside
them train, up to and including the turn's end token (the last special token of the turn: ``<|im_end|>`` for
ChatML, ``</s>`` or ``<|eot_id|>`` elsewhere). What the template adds after that token (a newline) does not train.
A model that never sees its end token trained does not learn to stop, and when pad and eos are the same token a mask
built by comparing ids with the pad id would drop it; this mask is built from character positions, so it cannot.
"""

from __future__ import annotations

import json

ROLES = ("system", "user", "assistant")

# `tokenize.chat_template` names for a base model without a template of its own. zephyr's turns end with the
# tokenizer's own eos token, so it fits any tokenizer that has one and needs no new tokens.
NAMED_TEMPLATES = {
    "zephyr": (
        "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    ),
    "chatml": (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
}


class ConversationError(ValueError):
    """A record whose conversation cannot be read: `reason` (a rejected-rows reason) and the message."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class TemplateError(ValueError):
    """The chat template does not render conversations in a way the answer tokens can be found in."""


def parse_messages(value, role_key: str, content_key: str, roles: dict[str, str]) -> list[dict]:
    """A messages value as read (a JSON text, or the list itself) as a conversation with our role names; roles
    missing from `roles` keep their name (validate rejects them with the name). Raises ConversationError."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConversationError("invalid_messages", f"not a JSON list of messages: {exc.msg} at column "
                                                        f"{exc.colno}") from None
    if isinstance(value, dict):
        raise ConversationError("invalid_messages", "expected a list of messages, found an object")
    if not isinstance(value, list):
        raise ConversationError("invalid_messages", f"expected a list of messages, found {type(value).__name__}")
    folded = {name.casefold(): ours for name, ours in roles.items()}
    out = []
    for number, message in enumerate(value, start=1):
        if not isinstance(message, dict):
            raise ConversationError("invalid_messages", f"message {number}: expected an object with "
                                                        f"{role_key!r} and {content_key!r}")
        missing = [key for key in (role_key, content_key) if key not in message]
        if missing:
            raise ConversationError("invalid_messages", f"message {number}: no key {', '.join(map(repr, missing))} "
                                                        f"(keys: {', '.join(map(repr, message))}); set "
                                                        f"clean.message_keys")
        role = message[role_key]
        if not isinstance(role, str):
            raise ConversationError("invalid_messages", f"message {number}: role {role!r} is not a string")
        out.append({"role": folded.get(role.strip().casefold(), role.strip()),
                    "content": content_text(message[content_key], number)})
    return out


def content_text(content, number: int) -> str:
    """A message's content as text: a string, or OpenAI's list of parts when every part is text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    if isinstance(content, (int, float)) and not isinstance(content, bool):
        return str(content)
    raise ConversationError("invalid_messages", f"message {number}: content is {type(content).__name__}, not text "
                                                f"(only text parts can be trained on)")


def from_columns(prompt: str | None, response: str | None, system: str | None = None, extra: str | None = None,
                 join: str = "\n\n") -> list[dict]:
    """A single-turn conversation from prompt/response columns; alpaca's input (`extra`) follows the instruction
    after `join` when it is not empty."""
    if prompt is None or response is None:
        raise ConversationError("missing_field", "no prompt and response (and no messages)")
    user = prompt if not extra or not extra.strip() else f"{prompt}{join}{extra}"
    messages = [{"role": "system", "content": system}] if system and system.strip() else []
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": response}]


def problems(messages: list[dict]) -> tuple[str, str] | None:
    """(reason, detail) when a conversation cannot train: unknown role, wrong order, empty turn; else None."""
    if not messages:
        return "empty_conversation", "no messages"
    for number, m in enumerate(messages, start=1):
        if m["role"] not in ROLES:
            return "unknown_role", (f"message {number}: role {m['role']!r} is not one of {', '.join(ROLES)}; map it "
                                    f"in clean.roles (e.g. {m['role']}: user), or remove such rows")
    for number, m in enumerate(messages, start=1):
        if not m["content"].strip():
            return "empty_turn", f"message {number} ({m['role']}) is empty"
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    offset = len(messages) - len(turns)
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            where = "a system message comes first or not at all" if m["role"] == "system" else f"{expected} expected"
            return "bad_turn_order", (f"message {offset + i + 1} is {m['role']} ({where}); a conversation is an "
                                      f"optional system message, then user and assistant turns in turn")
    if not turns:
        return "bad_turn_order", "a system message alone"
    if turns[-1]["role"] != "assistant":
        return "no_answer", f"the last message ({len(messages)}) is {turns[-1]['role']}; it must be the assistant's"
    return None


def first_user_turn(messages: list[dict]) -> str:
    return next((m["content"] for m in messages if m["role"] == "user"), "")


def context_of(messages: list[dict]) -> list[dict]:
    """The conversation before its last assistant turn: what the model is asked to answer at evaluation."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last]


# ------------------------------------------------------------------------------------------------ templates


def resolve_template(tokenizer, choice: str | None) -> None:
    """Give `tokenizer` the chat template of `tokenize.chat_template` (a name of NAMED_TEMPLATES, or a path to a
    Jinja file); with null, the model's own, which it must have."""
    from pathlib import Path

    from sft_pipeline.io import StageError

    if choice is None:
        if not getattr(tokenizer, "chat_template", None):
            raise StageError("the model's tokenizer has no chat template; set tokenize.chat_template to one of "
                             f"{', '.join(NAMED_TEMPLATES)} or to a Jinja file")
        return
    if choice in NAMED_TEMPLATES:
        tokenizer.chat_template = NAMED_TEMPLATES[choice]
        return
    path = Path(choice)
    if not path.is_file():
        raise StageError(f"tokenize.chat_template: {choice!r} is neither one of {', '.join(NAMED_TEMPLATES)} nor a "
                         f"file")
    tokenizer.chat_template = path.read_text(encoding="utf-8")


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def answer_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and, per assistant turn, the characters [start, end) of its answer as rendered
    (content and what the template closes the turn with)."""
    text = render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render(tokenizer, messages[:i], add_generation_prompt=True)
        through = render(tokenizer, messages[:i + 1])
        if not text.startswith(prefix) or not text.startswith(through) or len(through) <= len(prefix):
            raise TemplateError(
                f"the chat template does not render assistant turn {i + 1} as an extension of the conversation "
                f"before it (with add_generation_prompt), so its answer tokens cannot be located; set "
                f"tokenize.chat_template to a template that renders turns one after another")
        spans.append((len(prefix), len(through)))
    return text, spans


def special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    for token_id, token in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(token, "special", False):
            ids.add(int(token_id))
    return ids


def trained_mask(offsets, ids, spans, special: set[int]) -> tuple[list[bool], set[int]]:
    """Which tokens train (inside an answer span, up to and including the turn's last special token), and the
    end-of-turn token ids found. Raises TemplateError when an answer ends with no special token."""
    mask = [False] * len(ids)
    ends: set[int] = set()
    k = 0
    for start, end in spans:
        while k < len(ids) and offsets[k][0] < start:
            k += 1
        inside = []
        j = k
        while j < len(ids) and offsets[j][1] <= end and offsets[j][0] < end:
            inside.append(j)
            j += 1
        closing = [t for t in inside if ids[t] in special]
        if not closing:
            raise TemplateError("the chat template closes an assistant turn with no special token (an end-of-turn "
                                "or eos token), so the model could not learn to stop; set tokenize.chat_template "
                                "to a template that ends assistant turns with one (e.g. zephyr)")
        last = closing[-1]
        for t in inside:
            if t > last:
                break
            mask[t] = True
        ends.add(ids[last])
        k = j
    return mask, ends


def stop_ids(tokenizer) -> list[int]:
    """The tokens that end an answer in generation: the template's end-of-turn token(s) and eos."""
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    found: set[int] = set()
    try:
        text, spans = answer_spans(tokenizer, probe)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        _, found = trained_mask(enc["offset_mapping"], enc["input_ids"], spans, special_ids(tokenizer))
    except (TemplateError, ValueError):
        pass
    if tokenizer.eos_token_id is not None:
        found.add(int(tokenizer.eos_token_id))
    return sorted(found)
