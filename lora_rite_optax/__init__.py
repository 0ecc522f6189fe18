"""lora_rite_optax: LoRA-RITE and the LoRA optimizers it is compared with, in Optax."""

from lora_rite_optax.pairs import (LayoutSpec, LoneFactor, LoraLayout,
                                   LoraPair, NNX_LAYOUT, PEFT_LAYOUT,
                                   PairedTree, find_lora_pairs, lora_b_mask)

from lora_rite_optax import init
from lora_rite_optax.casting import with_gradients_dtypes
from lora_rite_optax.donation import DonatingJitted, donating_jit
from lora_rite_optax.factory import OPTIMIZER_NAMES, optimizer
from lora_rite_optax.loraplus import loraplus, loraplus_labels
from lora_rite_optax.scaled_adam import (ScaleByAdamAuthorsState,
                                         scale_by_adam_authors,
                                         scale_by_riemannian_precond,
                                         scaled_adam)
from lora_rite_optax.shampoo import (BlockStats, ShampooState,
                                     scale_by_shampoo, shampoo)

from lora_rite_optax.lora_rite import (ScaleByLoraRiteState,
                                       balance_lora_factors, lora_rite,
                                       pair_groups, scale_by_lora_rite)

__all__ = [
    # The optimizers.
    'lora_rite', 'scale_by_lora_rite', 'ScaleByLoraRiteState',
    'balance_lora_factors', 'pair_groups',
    'loraplus', 'loraplus_labels',
    'scaled_adam', 'scale_by_riemannian_precond', 'scale_by_adam_authors',
    'ScaleByAdamAuthorsState',
    'shampoo', 'scale_by_shampoo', 'ShampooState', 'BlockStats',
    'optimizer', 'OPTIMIZER_NAMES',
    # LoRA pairs, initialisations, the donating jit.
    'LoraLayout', 'LoraPair', 'NNX_LAYOUT', 'PEFT_LAYOUT', 'find_lora_pairs',
    'lora_b_mask', 'init', 'donating_jit', 'with_gradients_dtypes',
    # The types in those signatures.
    'LayoutSpec', 'PairedTree', 'LoneFactor', 'DonatingJitted',
]

__version__ = '0.1.0'
