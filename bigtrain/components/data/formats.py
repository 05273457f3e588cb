"""Records of a data source as token ids and a loss mask, by `data.format`:

- text: the record's text field, then the end-of-text token; every token is trained on.
- prompt_completion: the prompt field, then the completion field, then end-of-text; only the
  completion and its end-of-text are trained on (`data.train_on_prompt=true`: all of it).
- chat: the messages field, a list of {role, content}, rendered with the tokenizer's chat template,
  else `data.chat_template`, else DEFAULT_CHAT_TEMPLATE; only the assistant turns (each with the
  template's own end of turn) are trained on.

A mask is None where every token is trained on (text), else one 0/1 per token.
"""

from dataclasses import dataclass

from omegaconf import DictConfig

from bigtrain.errors import ConfigError

FORMATS = ("text", "prompt_completion", "chat")
ROLES = ("system", "user", "assistant")
# For tokenizers without a chat template: every turn as `<|role|>` on a line of its own, then its
# text; an assistant turn ends with the end-of-text token, so the model learns where to stop. Turns
# are separated by a line break, written as an expression: transformers renders templates with
# trim_blocks, which drops a literal line break that follows a block tag such as {% endif %}.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{% if messages %}{{ '\\n' }}{% endif %}<|assistant|>\n{% endif %}"
)


@dataclass
class Document:
    ids: list[int]
    mask: list[int] | None  # 1: trained on; None: every token


class Formatter:
    """Turns records of `data_cfg.format` into Documents with `tokenizer`."""

    def __init__(self, data_cfg: DictConfig, tokenizer):
        self.format = data_cfg.format
        self.cfg = data_cfg
        self.tokenizer = tokenizer
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.train_on_prompt = data_cfg.train_on_prompt
        if self.format == "chat":
            self.template = tokenizer.chat_template or data_cfg.chat_template or DEFAULT_CHAT_TEMPLATE
            if not tokenizer.is_fast:
                raise ConfigError(
                    f"data.format=chat needs a fast tokenizer (one with tokenizer.json) to find which tokens the "
                    f"assistant wrote; the tokenizer at {data_cfg.tokenizer} is a slow one. Save a fast one with "
                    "AutoTokenizer.from_pretrained(..., use_fast=True).save_pretrained(...)."
                )

    @property
    def masked(self) -> bool:
        """Whether documents carry a loss mask."""
        return self.format != "text" and not self.train_on_prompt

    def __call__(self, record: dict) -> Document:
        if self.format == "text":
            return Document(self._encode(record[self.cfg.text_field]) + self.eos, None)
        if self.format == "prompt_completion":
            prompt = self._encode(record[self.cfg.prompt_field])
            completion = self._encode(record[self.cfg.completion_field]) + self.eos
            return self._masked(prompt + completion, [0] * len(prompt) + [1] * len(completion))
        return self._chat(record[self.cfg.messages_field])

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _masked(self, ids: list[int], mask: list[int]) -> Document:
        return Document(ids, None if self.train_on_prompt else mask)

    def _chat(self, messages: list[dict]) -> Document:
        """Render the whole conversation once, then mark the tokens whose text lies in an assistant
        turn: from where the template would start the assistant's answer (the conversation before it,
        with the generation prompt) to where the turn ends."""
        text = self._render(messages, add_generation_prompt=False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                start = len(self._render(messages[:i], add_generation_prompt=True)) if i else 0
                spans.append((start, len(self._render(messages[: i + 1], add_generation_prompt=False))))
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoded["input_ids"]
        mask = [int(any(start <= begin < end for start, end in spans)) for begin, _ in encoded["offset_mapping"]]
        if self.eos and ids[-1:] != self.eos:  # a document ends with end-of-text, trained on after an answer
            ids, mask = ids + self.eos, mask + [mask[-1] if mask else 0]
        return self._masked(ids, mask)

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt,
        )


def check_record(record: dict, data_cfg: DictConfig, where: str) -> None:
    """Refuse a record without the fields its format reads, naming the field and the fix."""
    if not isinstance(record, dict):
        raise ConfigError(f"{where} is not a record with named fields (got {type(record).__name__}).")
    present = sorted(record)
    if data_cfg.format == "text":
        _require(record, data_cfg.text_field, "data.text_field", present, where)
        _require_text(record, data_cfg.text_field, where)
    elif data_cfg.format == "prompt_completion":
        for key in ("prompt_field", "completion_field"):
            _require(record, data_cfg[key], f"data.{key}", present, where)
            _require_text(record, data_cfg[key], where)
    else:
        _require(record, data_cfg.messages_field, "data.messages_field", present, where)
        _check_messages(record[data_cfg.messages_field], data_cfg.messages_field, where)


def _require(record: dict, field: str, key: str, present: list[str], where: str) -> None:
    if field not in record:
        raise ConfigError(
            f"{where} has no field {field!r} ({key}), which data.format reads; its fields are {present}. Set {key} "
            "to the field that holds it, or choose the data.format the data is in (text, prompt_completion, chat)."
        )


def _require_text(record: dict, field: str, where: str) -> None:
    if not isinstance(record[field], str):
        raise ConfigError(f"{where}: field {field!r} holds {type(record[field]).__name__}, not text.")


def _check_messages(messages, field: str, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise ConfigError(
            f"{where}: field {field!r} (data.messages_field) must be a non-empty list of {{role, content}} messages, "
            f"got {type(messages).__name__}."
        )
    for number, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            keys = sorted(message) if isinstance(message, dict) else type(message).__name__
            raise ConfigError(
                f"{where}: message {number} of {field!r} needs a 'role' and a 'content' (it has {keys}). Each message "
                "is {\"role\": \"user\" | \"assistant\" | \"system\", \"content\": \"...\"}."
            )
        if message["role"] not in ROLES:
            raise ConfigError(
                f"{where}: message {number} has role {message['role']!r}; the roles are {', '.join(ROLES)}. "
                "Rename the role in the data (e.g. human -> user, gpt -> assistant)."
            )
        if not isinstance(message["content"], str):
            raise ConfigError(f"{where}: message {number}'s content is {type(message['content']).__name__}, not text.")
    if not any(m["role"] == "assistant" for m in messages):
        raise ConfigError(f"{where}: the conversation has no assistant message, so nothing in it would be trained on.")
