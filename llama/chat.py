"""Chat prompts in the format each model family was tuned with, as token ids.

Llama 2 writes a dialog as text ([INST] ... [/INST], the system message inside the first turn) and
encodes it with BOS/EOS around each finished turn. Llama 3 uses special tokens: <|begin_of_text|>,
then per message <|start_header_id|>role<|end_header_id|>\\n\\n content <|eot_id|>, then the assistant
header the model completes (Meta's ChatFormat in llama-models). Special tokens are placed by id, so a
message that types "<|eot_id|>" stays text. `dialog_tokens` picks the format from `tokenizer.family`.
"""

from typing import Literal, TypedDict

from llama.errors import UserError
from llama.tokenizer import TiktokenTokenizer, Tokenizer

Role = Literal["system", "user", "assistant"]
ROLES = ("system", "user", "assistant")


class Message(TypedDict):
    role: Role
    content: str


B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


def check_messages(dialog: list[Message]) -> None:
    """Every message is {"role": system|user|assistant, "content": str}."""
    for i, message in enumerate(dialog):
        if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(message.get("content"), str):
            raise UserError(f"message {i} of the dialog must be {{'role': one of {', '.join(ROLES)}, 'content': a string}}, "
                            f"got {message!r:.80}")


def llama2_tokens(tokenizer: Tokenizer, dialog: list[Message]) -> list[int]:
    """Llama 2: <s>[INST] user [/INST] answer </s><s>[INST] ... [/INST], the system message in the first turn."""
    check_messages(dialog)
    if dialog and dialog[0]["role"] == "system":
        first = {"role": "user", "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]} if len(dialog) > 1 else None
        dialog = ([first] if first else []) + list(dialog[2:])
    roles = [m["role"] for m in dialog]
    if not dialog or roles[-1] != "user" or any(r != ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(roles)):
        raise UserError("a dialog must be an optional system message, then user/assistant turns alternating, ending with user")
    ids: list[int] = []
    for user, answer in zip(dialog[::2], dialog[1::2]):
        ids += tokenizer.encode(f"{B_INST} {user['content'].strip()} {E_INST} {answer['content'].strip()} ", bos=True, eos=True)
    ids += tokenizer.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
    return ids


def llama3_header(tokenizer: TiktokenTokenizer, role: str) -> list[int]:
    """<|start_header_id|>role<|end_header_id|>\\n\\n: what starts every message."""
    special = tokenizer.special_tokens
    return [special["<|start_header_id|>"], *tokenizer.encode(role, bos=False, eos=False), special["<|end_header_id|>"],
            *tokenizer.encode("\n\n", bos=False, eos=False)]


def llama3_tokens(tokenizer: TiktokenTokenizer, dialog: list[Message]) -> list[int]:
    """Llama 3: <|begin_of_text|>, each message as header + content + <|eot_id|>, then the assistant header.

    Like Meta's ChatFormat, content is not stripped and any order of roles is accepted.
    """
    check_messages(dialog)
    ids = [tokenizer.bos_id]
    for message in dialog:
        ids += llama3_header(tokenizer, message["role"]) + tokenizer.encode(message["content"], bos=False, eos=False) + [tokenizer.eot_id]
    return ids + llama3_header(tokenizer, "assistant")


FORMATS = {"llama2": llama2_tokens, "llama3": llama3_tokens}


def dialog_tokens(tokenizer: Tokenizer, dialog: list[Message]) -> list[int]:
    """The prompt a chat model completes with the next assistant answer, in its family's format."""
    return FORMATS[tokenizer.family](tokenizer, dialog)


def answer_tokens(tokenizer: Tokenizer, answer: str) -> list[int]:
    """An assistant answer as it follows `dialog_tokens` in training: content + end of turn.

    Llama 2 ends a turn with EOS (the answer stripped, as `llama2_tokens` writes finished turns);
    Llama 3 with <|eot_id|>, content as is (Meta's ChatFormat.encode_message).
    """
    if tokenizer.family == "llama3":
        return tokenizer.encode(answer, bos=False, eos=False) + [tokenizer.eot_id]
    return tokenizer.encode(answer.strip(), bos=False, eos=True)


# The same formats as Jinja chat templates, for Hugging Face's tokenizer_config.json, GGUF's
# tokenizer.chat_template and the server's /tokenizer_info. Llama 2: Meta's template as published
# in meta-llama/Llama-2-7b-chat-hf. Llama 3: meta-llama/Meta-Llama-3-8B-Instruct's, without its
# `| trim` (Meta's ChatFormat, and `llama3_tokens`, keep content as is). tests/test_hf_tokenizer.py
# checks that transformers' apply_chat_template with them gives `dialog_tokens`' ids.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
CHAT_TEMPLATES = {"llama2": LLAMA2_CHAT_TEMPLATE, "llama3": LLAMA3_CHAT_TEMPLATE}
