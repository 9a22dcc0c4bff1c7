"""Chat templates for tokenizers that ship none: `--chat_dataset.template llama3|llama2|chatml`.

They are Jinja strings that transformers' `apply_chat_template` renders exactly as it
renders a tokenizer's own template, so both paths share one renderer. Message content is
trimmed (Meta's Llama 3 template does the same), so no whitespace at the start of a turn
can merge with the end of its header into one token.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChatTemplate:
    jinja: str
    # Strings the tokenizer must encode as one special token each, or the rendering
    # would be tokenized as plain text and the model would learn the wrong format.
    special_tokens: tuple[str, ...]
    # The template writes the tokenizer's bos_token/eos_token, so both must be set.
    uses_bos_eos: bool = False


# Meta's Llama 3 instruct format (without 3.1's date header, which is a system-prompt choice).
LLAMA3 = ChatTemplate(
    jinja=(
        "{{- '<|begin_of_text|>' }}"
        "{%- for message in messages %}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
    ),
    special_tokens=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
)

# Meta's Llama 2 chat format: [INST] around each user turn, the system prompt inside the
# first one, each exchange wrapped in bos ... eos. Roles must alternate user/assistant.
LLAMA2 = ChatTemplate(
    jinja=(
        "{%- if messages and messages[0]['role'] == 'system' %}"
        "{%- set system = messages[0]['content'] | trim %}{%- set turns = messages[1:] %}"
        "{%- else %}{%- set system = '' %}{%- set turns = messages %}{%- endif %}"
        "{%- for message in turns %}"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{- raise_exception('roles must alternate user/assistant after the system prompt (llama2 template)') }}"
        "{%- endif %}"
        "{%- if message['role'] == 'user' %}"
        "{%- set content = message['content'] | trim %}"
        "{%- if loop.first and system %}{%- set content = '<<SYS>>\n' + system + '\n<</SYS>>\n\n' + content %}{%- endif %}"
        "{{- bos_token + '[INST] ' + content + ' [/INST]' }}"
        "{%- else %}"
        "{{- ' ' + message['content'] | trim + ' ' + eos_token }}"
        "{%- endif %}"
        "{%- endfor %}"
    ),
    special_tokens=(),
    uses_bos_eos=True,
)

# ChatML (Qwen, OpenAI's original chat markup): no bos; <|im_end|> ends every turn.
CHATML = ChatTemplate(
    jinja=(
        "{%- for message in messages %}"
        "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
    ),
    special_tokens=("<|im_start|>", "<|im_end|>"),
)

TEMPLATES = {"llama3": LLAMA3, "llama2": LLAMA2, "chatml": CHATML}
