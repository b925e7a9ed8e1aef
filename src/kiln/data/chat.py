"""Chat templates: a conversation -> the prompt text a chat model was trained on -> token ids.

A run keeps its template in chat_template.jinja and its special tokens in tokenizer_config.json (the file
names transformers uses). The template is rendered as transformers' `apply_chat_template` renders it: Jinja2's
sandbox with trim_blocks and lstrip_blocks, the loop-controls extension, `raise_exception`, `strftime_now` and
a `tojson` that does not escape HTML, with `messages`, `add_generation_prompt` and the special tokens
(bos_token, eos_token, ...) as variables. A run without a template chats in ChatML.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from kiln.errors import KilnError

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
          " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
ROLES = ("system", "user", "assistant", "tool")
# the end-of-turn markers of the common templates: a reply ends at the first one the template writes
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>", "<|END_OF_TURN_TOKEN|>")
TEMPLATE_FILE, TOKENIZER_CONFIG = "chat_template.jinja", "tokenizer_config.json"
SPECIAL_ROLES = ("bos_token", "eos_token", "unk_token", "pad_token")


def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class ChatTemplate:
    """A Jinja chat template with the special tokens it may refer to."""

    def __init__(self, source: str | None = None, specials: dict | None = None, where: str = "chat template"):
        import jinja2

        self.source = source or CHATML
        self.is_default = source is None
        self.specials = {k: v for k, v in (specials or {}).items() if k in SPECIAL_ROLES and isinstance(v, str)}
        self.where = where
        try:
            self._template = _environment().from_string(self.source)
        except jinja2.exceptions.TemplateError as e:
            raise KilnError(f"{where}: not a valid Jinja template ({str(e).splitlines()[0]})") from None

    @classmethod
    def of_run(cls, run_dir: str | Path) -> "ChatTemplate":
        """The run's chat_template.jinja (ChatML when it has none) and tokenizer_config.json's special tokens."""
        run = Path(run_dir)
        specials = {}
        if (run / TOKENIZER_CONFIG).is_file():
            try:
                specials = json.loads((run / TOKENIZER_CONFIG).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise KilnError(f"{run / TOKENIZER_CONFIG}: cannot read JSON ({str(e).splitlines()[0]})") from None
        source = (run / TEMPLATE_FILE).read_text(encoding="utf-8") if (run / TEMPLATE_FILE).is_file() else None
        return cls(source, specials, str(run / TEMPLATE_FILE))

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text of `messages`; a KilnError when a message is malformed or the template fails."""
        import jinja2

        check_messages(messages)
        try:
            return self._template.render(messages=[dict(m) for m in messages],
                                         add_generation_prompt=add_generation_prompt, **self.specials)
        except jinja2.exceptions.TemplateError as e:
            raise KilnError(f"{self.where}: the template failed to render this conversation "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        except Exception as e:  # a template bug hit at render time (a missing key, a type error)
            raise KilnError(f"{self.where}: the template failed to render this conversation "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None

    def end_of_turn(self) -> list[str]:
        """The strings that end an assistant reply: the end-of-turn markers this template writes, and eos."""
        marks = [m for m in END_OF_TURN if m in self.source]
        eos = self.specials.get("eos_token")
        return marks + ([eos] if eos and eos not in marks else [])


def check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise KilnError("messages: expected a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise KilnError(f"messages.{i}: expected an object with a string role and a string content")
        if m["role"] not in ROLES:
            raise KilnError(f"messages.{i}: unknown role {m['role']!r}; one of {', '.join(ROLES)}")


def encode_chat(tokenizer, template: ChatTemplate, messages: list[dict], context_length: int,
                reserve: int = 1) -> list[int]:
    """Token ids of the rendered conversation (special tokens written by the template are kept as they are,
    nothing is added: transformers' apply_chat_template(tokenize=True)); a KilnError when they leave fewer
    than `reserve` positions of the context for the reply."""
    from kiln.data.tokenizer import encode_text, tokenizer_kind

    text = template.render(messages)
    if tokenizer_kind(tokenizer) == "char":  # names the characters a char vocabulary lacks
        ids = encode_text(tokenizer, text, "messages")
    else:
        try:
            ids = tokenizer.encode(text, add_special_tokens=False).ids
        except Exception as e:  # e.g. a WordLevel vocabulary without an unknown token
            raise KilnError(f"messages: the tokenizer cannot encode this conversation ({str(e).splitlines()[0]})") from None
    if len(ids) + reserve > context_length:
        raise KilnError(f"the conversation is {len(ids)} tokens, and this model's context is {context_length} "
                        f"tokens: shorten it (or start again: /reset in kiln chat)")
    return ids


def stop_tokens(tokenizer, template: ChatTemplate) -> tuple[list[int], list[str]]:
    """(ids of the end-of-turn markers that are single tokens, the others as stop strings)."""
    ids, strings = [], []
    for mark in template.end_of_turn():
        i = tokenizer.token_to_id(mark)
        (ids.append(i) if i is not None else strings.append(mark))
    return ids, strings
