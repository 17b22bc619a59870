"""Special tokens and label constants shared by data, model and evaluation."""

IGNORE_INDEX = -100

DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_IMAGE_PATCH_TOKEN = "<im_patch>"
DEFAULT_IM_START_TOKEN = "<im_start>"
DEFAULT_IM_END_TOKEN = "<im_end>"
DEFAULT_PAD_TOKEN = "[PAD]"

# Conversation roles of a record's turns ({"from": HUMAN | GPT, "value": ...}), the reference's names.
HUMAN = "human"
GPT = "gpt"

# Research-use notice shown by the demo, the web UI and the README.
RESEARCH_USE_NOTICE = (
    "Research use only. ExGra-Med models and data are intended for research on medical AI; they are "
    "not medical devices and must not be used for diagnosis or treatment decisions."
)
