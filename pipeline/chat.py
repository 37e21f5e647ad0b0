"""The prompt of a chat: one rule for the turns `ingest` reads and the messages a service receives.

A chat is a list of turns. A turn is a string (what the user sent) or a message: `{"role", "content"}`
(OpenAI; content a string or a list of parts, whose `{"type": "text", "text"}` parts count, each as a
turn) or `{"from", "value"}` (ShareGPT). The prompt is the text of the user's turns in order, joined
with blank lines. System, assistant and tool turns are left out: the router sees what the user sent,
never a reply or the deployment's instructions, so a service that passes a system message routes as
the training data was read. Pure Python: the torch-free runtime imports it.
"""
from __future__ import annotations

USER_ROLES = ("user", "human")  # OpenAI, ShareGPT; a message with neither role nor from is the user's too


class NotText(ValueError):
    """A turn the rule cannot read; the message names it (`[i]`, `[i].content[j]`)."""


def _content_texts(content, where: str) -> list[str]:
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise NotText(f"{where} must be a string or a list of parts")
    texts = []
    for j, part in enumerate(content):
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict):
            if part.get("type", "text") == "text":
                if not isinstance(part.get("text"), str):
                    raise NotText(f"{where}[{j}].text must be a string")
                texts.append(part["text"])
        else:
            raise NotText(f"{where}[{j}] must be an object")
    return texts


def chat_prompt(turns) -> str:
    """The user's text of `turns`, joined with blank lines ("" when there is none); NotText otherwise."""
    if not isinstance(turns, list):
        raise NotText("a chat must be a list of turns")
    texts: list[str] = []
    for i, turn in enumerate(turns):
        if turn is None or isinstance(turn, str):
            texts += [turn] if turn is not None else []
            continue
        if not isinstance(turn, dict):
            raise NotText(f"[{i}] must be a string or an object")
        role = turn.get("role", turn.get("from", "user"))
        if not isinstance(role, str):
            raise NotText(f"[{i}].role must be a string")
        if role.lower() not in USER_ROLES:
            continue
        key = next((k for k in ("content", "value", "text") if k in turn), None)
        if key is None:
            raise NotText(f"[{i}] has no content")
        texts += _content_texts(turn[key], f"[{i}].{key}")
    return "\n\n".join(texts)
