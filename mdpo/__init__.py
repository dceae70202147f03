"""mdpo: Direct Preference Optimization on NVIDIA Megatron-Core."""

import warnings

# Megatron-Core announces at import that Transformer Engine and Apex are absent; on CPU and on GPUs without them
# that is expected, and the fallbacks it names are the paths mdpo runs and tests.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).*not installed", category=UserWarning)
