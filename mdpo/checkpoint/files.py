"""The names of the files mdpo writes into checkpoint folders, in one place."""

MODEL_FILE = "mdpo_model.json"  # a `mdpo convert` output's model description
MODEL_FORMAT = "mdpo-megatron"  # its "format" field
TRAINING_META = "mdpo_meta.json"  # a training checkpoint's step, consumed pairs, layout and config
MANIFEST = "mdpo_manifest.json"  # every file of a training checkpoint: its size, and a checksum of the small ones
COMPLETE = "COMPLETE"  # written last into a training checkpoint: a folder without it is never loaded
# Every file of a Megatron checkpoint folder (dist_checkpointing's and mdpo's own): never a HF auxiliary file.
CHECKPOINT_FILES = ("metadata.json", "common.pt", ".metadata", MODEL_FILE, TRAINING_META, MANIFEST, COMPLETE)
