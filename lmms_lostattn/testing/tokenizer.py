"""The byte-level BPE tokenizer every tiny model uses: :data:`CORPUS`, :func:`build_tokenizer`, special tokens and the
chat templates several families share (LLaVA's, ChatML)."""

from __future__ import annotations

from collections.abc import Sequence

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
IMAGE_TOKEN = "<image>"
_VOCAB_SIZE = 400

# ChatML's control tokens (Qwen, InternVL).
CHATML_TOKENS = {"pad": "<|endoftext|>", "im_start": "<|im_start|>", "eos": "<|im_end|>"}

# Vicuna / LLaVA-1.5 layout ("USER: <image>\n... ASSISTANT:"). Content may be a string (lmms-eval's simple llava_hf
# calls ``tokenizer.apply_chat_template`` with "<image>" already in the text) or a list of typed parts (chat class,
# ``processor.apply_chat_template``), where each image part renders as "<image>\n" in place.
LLAVA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] != 'system' -%}{{ message['role'].upper() + ': ' }}{%- endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<image>\\n' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- if not loop.last -%}{{ ' ' }}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{ eos_token }}{%- endif -%}"
    "{{ ' ' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

CORPUS = """\
A chat between a curious user and an artificial intelligence assistant.
The assistant gives helpful, detailed, and polite answers to the user's questions.
USER: Is there a cat in the image? ASSISTANT: Yes, there is a cat.
USER: Is there a dog in the image? ASSISTANT: No, there is no dog.
USER: What color is the car? ASSISTANT: The car is red.
USER: How many people are in the picture? ASSISTANT: There are two people.
USER: Answer the question using a single word or phrase. ASSISTANT: Yes
USER: Describe the image in detail. ASSISTANT: A small white cat sits on a wooden table next to a blue cup.
Please answer yes or no. Is the object on the left larger than the object on the right?
The photo shows a street with cars, a bus, trees, a person riding a bicycle and a traffic light.
Options: A. red B. green C. blue D. yellow. Answer with the option's letter from the given choices directly.
What is written on the sign? What is the man holding? Where is the woman standing? Which animal is this?
0 1 2 3 4 5 6 7 8 9 10 100 1000, . ; : ! ? ' " ( ) [ ] - + = / * % $ # @ & _ < > { } | \\ ~ ^
"""


def chatml_template(image: str, video: str) -> str:
    """ChatML with a default system turn, as Qwen's and InternVL's templates. String contents pass through; typed
    parts render the given image/video placeholders, which the processor expands to one token per patch."""
    return (
        "{%- for message in messages -%}"
        "{%- if loop.first and message['role'] != 'system' -%}"
        "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for part in message['content'] -%}"
        f"{{%- if part['type'] == 'image' -%}}{{{{ {image!r} }}}}"
        f"{{%- elif part['type'] == 'video' -%}}{{{{ {video!r} }}}}"
        "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{{ '<|im_end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )


def build_tokenizer(
    special_tokens: Sequence[str] = tuple(SPECIAL_TOKENS),
    *,
    unk: str | None = "<unk>",
    bos: str | None = "<s>",
    eos: str = "</s>",
    pad: str = "<pad>",
    extra_special_tokens: dict[str, str] | None = None,
    chat_template: str = LLAVA_CHAT_TEMPLATE,
    padding_side: str = "right",
    corpus: str = CORPUS,
):
    """Train a small byte-level BPE on ``corpus`` (default: the built-in one) and wrap it as a transformers fast
    tokenizer.

    The defaults are LLaVA's (Llama-style: ``<s>`` prepended to every text); ``bos=None`` adds nothing (ChatML).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus.splitlines() * 4, trainer=trainer)
    # trim_offsets=False keeps byte-level offsets usable.
    steps = [processors.ByteLevel(trim_offsets=False)]
    if bos is not None:  # Llama-style: prepend BOS to every encoded text
        steps.append(
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
            )
        )
    tok.post_processor = processors.Sequence(steps)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=unk,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        extra_special_tokens={"image_token": IMAGE_TOKEN} if extra_special_tokens is None else extra_special_tokens,
        chat_template=chat_template,
        model_max_length=4096,
        padding_side=padding_side,
    )
