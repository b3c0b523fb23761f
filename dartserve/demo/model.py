"""The demo model's tokenizer, processor and architecture: a real LLaVA-1.5 layout at small size."""

from __future__ import annotations

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from dartserve.demo.data import COLOURS, DESCRIBE_QUESTIONS, NUMBERS, PLACES, SHAPES, SIZE

PATCH = 14
# LLaVA-1.5's layout: the image opens the first user turn, the question follows it, and a
# follow-up turn is text alone, answered from the image tokens already in the cache. A system
# message is left out: none of its words are in the demo's vocabulary (WORDS).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}</s>{% endif %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
WORDS = sorted(
    set(SHAPES)
    | set(COLOURS)
    | set(NUMBERS)
    | {word for text in (*DESCRIBE_QUESTIONS, *PLACES) for word in text.split()}
    | set("what colour is the shape object how many objects are there a an left of above yes no and user assistant".split())
    | {"?", ":", ".", ","}
)
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the task's vocabulary: case-insensitive, American spelling accepted."""
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(Regex(r"\bcolor\b"), "colour")])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, none before punctuation
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )


def build_processor() -> LlavaProcessor:
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS, which the "default" strategy drops again
        chat_template=CHAT_TEMPLATE,
        image_token="<image>",
    )


def build_model(tokenizer: PreTrainedTokenizerFast, width: int = 128, layers: int = 6, vision_width: int = 128, vision_layers: int = 3) -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(
        hidden_size=vision_width,
        intermediate_size=2 * vision_width,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=SIZE,
        patch_size=PATCH,
    )
    text = LlamaConfig(
        hidden_size=width,
        intermediate_size=int(width * 2.75),
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(SIZE // PATCH) ** 2,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=True,
    )
    config._attn_implementation = "sdpa"
    return LlavaForConditionalGeneration(config)
