"""``transformers`` models from small configs, with the library's own random init.

Nothing is downloaded: every model is built from a config object. ``build(name, **over)``
returns the model with config fields overridden (``initializer_range``, ``hidden_act`` ...),
``SPECS`` says how each is fed.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

_TEXT = dict(vocab_size=1000, max_position_embeddings=64)
_BERTLIKE = dict(_TEXT, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128)
_DECODER = dict(_BERTLIKE, num_key_value_heads=2)

#: name -> (config class, model class, config kwargs, input kind)
SPECS: dict[str, tuple[str, str, dict[str, Any], str]] = {
    # causal language models (input kind "lm": token ids, shifted next-token loss)
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=50257, n_positions=64, n_embd=64, n_layer=12, n_head=4), "lm"),
    "llama": ("LlamaConfig", "LlamaForCausalLM", _DECODER, "lm"),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_DECODER, sliding_window=16), "lm"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _DECODER, "lm"),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", _BERTLIKE, "lm"),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(_TEXT, hidden_size=64, num_hidden_layers=4, ffn_dim=128, num_attention_heads=4, word_embed_proj_dim=64), "lm"),
    "phi": ("PhiConfig", "PhiForCausalLM", _BERTLIKE, "lm"),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(vocab_size=1000, hidden_size=64, n_layer=4, n_head=4), "lm"),
    # encoders (input kind "mlm": token ids, loss on every position; "cls": sequence labels)
    "bert": ("BertConfig", "BertForMaskedLM", _BERTLIKE, "mlm"),
    "albert": ("AlbertConfig", "AlbertForMaskedLM", dict(_BERTLIKE, embedding_size=32), "mlm"),
    "roberta": ("RobertaConfig", "RobertaForSequenceClassification", dict(_BERTLIKE, max_position_embeddings=80, num_labels=3), "cls"),
    "distilbert": ("DistilBertConfig", "DistilBertForSequenceClassification", dict(_TEXT, dim=64, n_layers=3, n_heads=4, hidden_dim=128, num_labels=3), "cls"),
    "deberta_v2": ("DebertaV2Config", "DebertaV2ForSequenceClassification", dict(_BERTLIKE, num_labels=3), "cls"),
    # encoder-decoder (input kind "s2s")
    "t5": ("T5Config", "T5ForConditionalGeneration", dict(vocab_size=1000, d_model=64, d_kv=16, d_ff=128, num_layers=3, num_heads=4, decoder_start_token_id=0), "s2s"),
    "bart": ("BartConfig", "BartForConditionalGeneration", dict(_TEXT, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128), "s2s"),
    # vision (input kind "img": 32x32 or 64x64 images, 10 classes)
    "resnet": ("ResNetConfig", "ResNetForImageClassification", dict(embedding_size=16, hidden_sizes=[32, 64, 128, 256], depths=[2, 2, 2, 2], layer_type="bottleneck", num_labels=10), "img"),
    "convnext": ("ConvNextConfig", "ConvNextForImageClassification", dict(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 3, 1], num_labels=10), "img"),
    "convnextv2": ("ConvNextV2Config", "ConvNextV2ForImageClassification", dict(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 3, 1], num_labels=10), "img"),
    # HF's classifier_dropout_prob defaults (0.999, 0.8) are the TF keep probabilities: as a
    # drop probability 0.999 feeds the classifier 0.1% of the features
    "mobilenet_v1": ("MobileNetV1Config", "MobileNetV1ForImageClassification", dict(image_size=32, depth_multiplier=0.25, num_labels=10, classifier_dropout_prob=0.2), "img"),
    "mobilenet_v2": ("MobileNetV2Config", "MobileNetV2ForImageClassification", dict(image_size=32, depth_multiplier=0.35, num_labels=10, classifier_dropout_prob=0.2), "img"),
    "efficientnet": ("EfficientNetConfig", "EfficientNetForImageClassification", dict(image_size=32, width_coefficient=0.5, depth_coefficient=0.5, hidden_dim=640, num_labels=10), "img"),
    "regnet": ("RegNetConfig", "RegNetForImageClassification", dict(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1], groups_width=8, num_labels=10), "img"),
    "vit": ("ViTConfig", "ViTForImageClassification", dict(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, num_labels=10), "img"),
    "swin": ("SwinConfig", "SwinForImageClassification", dict(image_size=32, patch_size=2, embed_dim=16, depths=[1, 1, 2], num_heads=[2, 2, 4], window_size=4, num_labels=10), "img"),
    "dinov2": ("Dinov2Config", "Dinov2ForImageClassification", dict(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, mlp_ratio=2, num_labels=10), "img"),
    "beit": ("BeitConfig", "BeitForImageClassification", dict(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, num_labels=10), "img"),
    "poolformer": ("PoolFormerConfig", "PoolFormerForImageClassification", dict(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1], num_labels=10), "img"),
    "focalnet": ("FocalNetConfig", "FocalNetForImageClassification", dict(image_size=32, patch_size=2, embed_dim=16, depths=[1, 1, 2], num_labels=10), "img"),
    "mobilevit": ("MobileViTConfig", "MobileViTForImageClassification", dict(image_size=64, patch_size=2, hidden_sizes=[48, 64, 80], neck_hidden_sizes=[16, 16, 24, 48, 64, 80, 320], num_labels=10), "img64"),
    "levit": ("LevitConfig", "LevitForImageClassification", dict(image_size=64, hidden_sizes=[64, 96, 128], num_attention_heads=[2, 3, 4], depths=[1, 1, 1], key_dim=[16, 16, 16], num_labels=10), "img64"),
    "pvt_v2": ("PvtV2Config", "PvtV2ForImageClassification", dict(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 2, 4], num_labels=10), "img64"),
}


#: models whose transformers ``_init_weights`` draws BatchNorm gains from N(0, 0.02) like a
#: weight matrix (EfficientNet, MobileViT): their signal vanishes at init (EfficientNet's
#: logits are ~1e-33 at this size). The healthy zoo builds them with BN gains 1, as
#: torchvision and timm do; the broken zoo keeps the library's init.
BN_GAIN_BUG = ("efficientnet", "mobilevit")


def build(name: str, seed: int = 0, library_init: bool = False, **over: Any) -> nn.Module:
    """The model ``name`` of :data:`SPECS` with config fields ``over``, seeded init.
    ``library_init``: keep the library's BatchNorm gains even where they are broken."""
    import transformers

    cfg_cls, model_cls, kw, _ = SPECS[name]
    cfg = getattr(transformers, cfg_cls)(**{**kw, **over})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg)
    if name in BN_GAIN_BUG and not library_init:
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
    return model


def kind(name: str) -> str:
    return SPECS[name][3]
