"""Flax NNX models (Gemma 1/2/3, T5 v1.1 / mT5) with LoRA adapters.

Runs from a clone (like flax's examples); not part of the `lora_rite_optax` wheel.
"""
