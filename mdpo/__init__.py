"""mdpo: Direct Preference Optimization on NVIDIA Megatron-Core."""

import logging
import warnings

# Megatron-Core announces at import that Transformer Engine and Apex are absent; on CPU and on GPUs without them
# that is expected, and the fallbacks it names are the paths mdpo runs and tests.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).*not installed", category=UserWarning)
# A CUDA build of torch on a machine without a GPU logs at import that it found no CUDA runtime (CPU runs of
# megatron-core 0.19, which needs Python 3.12, where only CUDA wheels of torch exist).
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
