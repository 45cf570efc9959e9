"""adaptercli: train, compose and share adapters on frozen Hugging Face transformers.

    import adaptercli
    model = adaptercli.AutoAdapterModel.from_pretrained("bert-base-uncased")
    model.add_adapter("sst2", config="seq_bn")
    model.add_classification_head("sst2", num_labels=2)
    model.train_adapter("sst2")
"""

from .architectures import layout_from_dict, register_architecture
from .composition import Average, BatchSplit, CompositionError, Fuse, Parallel, Split, Stack
from .errors import AdapterCliError
from .methods import BnConfig, LoRAConfig, PrefixTuningConfig, resolve_config
from .methods.fusion import FusionConfig
from .model import AdapterModel, AutoAdapterModel, MultiHeadOutput, init

__version__ = "0.1.0"

__all__ = [
    "AdapterCliError", "AdapterModel", "AutoAdapterModel", "Average", "BatchSplit", "BnConfig", "CompositionError",
    "Fuse", "FusionConfig", "LoRAConfig", "MultiHeadOutput", "Parallel", "PrefixTuningConfig", "Split", "Stack",
    "init", "layout_from_dict", "register_architecture", "resolve_config",
]
