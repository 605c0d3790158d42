"""MMEB-V2's image-task text: instructions apart (`qry_inst`, `tgt_inst`), the prompt assembled in code.

VLM2Vec V2 reads `ziyjiang/MMEB_Test_Instruct` (per dataset `<Dataset>/test-*.parquet` with `qry_inst`,
`qry_text`, `qry_img_path`, `tgt_inst`, `tgt_text`, `tgt_img_path`) and builds the text of each input
with one of five rules, chosen per dataset in its `experiments/public/eval/image.yaml`. The rules below
restate what its `src/data/eval_dataset/image_*` parsers do, with mmfast's image marker `<|image_1|>`
where V2 writes the backbone's image token (the encoder rewrites the marker for its backbone):

- image_cls, image_i2t: query = "<|image_1|> {inst without marker} {qry_text}", query image; candidates
  are the `tgt_text` strings alone, without images.
- image_qa: as image_cls, the instruction on its own line ("\\n" + inst without marker, stripped).
- image_t2i: query = "{qry_inst} {qry_text}\\n" (one more "\\n" for VisDial), no query image; each
  candidate is its image with "<|image_1|> {tgt_inst without marker}" (plus " {caption}" when the
  first caption is not blank).
- image_i2i_vg: the query as image_qa; candidates as image_t2i, but without the last "\\n" when there
  are no captions.
In every rule but the t2i query, " \\n" becomes "\\n" and a "\\n" ends the text (V2 keeps V1's texts so).

`assemble(rule, row, dataset)` gives the query (text, image) and the candidates [(text, image)]; image
paths stay relative (the caller resolves them against the image root).
"""

from __future__ import annotations

from collections.abc import Mapping

from ..placeholder import IMAGE_PLACEHOLDER

RULES = ("image_cls", "image_qa", "image_t2i", "image_i2t", "image_i2i_vg")
# The columns each rule reads; a file's other columns with content are reported as not read.
RULE_COLUMNS = {
    "image_cls": ("qry_inst", "qry_text", "qry_img_path", "tgt_text"),
    "image_qa": ("qry_inst", "qry_text", "qry_img_path", "tgt_text"),
    "image_i2t": ("qry_inst", "qry_text", "qry_img_path", "tgt_text"),
    "image_t2i": ("qry_inst", "qry_text", "tgt_inst", "tgt_text", "tgt_img_path"),
    "image_i2i_vg": ("qry_inst", "qry_text", "qry_img_path", "tgt_inst", "tgt_text", "tgt_img_path"),
}

_NAMES = {
    "image_cls": "ImageNet-1K N24News HatefulMemes VOC2007 SUN397 Place365 ImageNet-A ImageNet-R ObjectNet Country211",
    "image_qa": "OK-VQA A-OKVQA DocVQA InfographicsVQA ChartQA Visual7W ScienceQA VizWiz GQA TextVQA",
    "image_i2t": "MSCOCO_i2t VisualNews_i2t",
    "image_t2i": "VisDial MSCOCO_t2i VisualNews_t2i WebQA EDIS Wiki-SS-NQ",
    "image_i2i_vg": "CIRR NIGHTS OVEN FashionIQ MSCOCO RefCOCO RefCOCO-Matching Visual7W-Pointing",
}
# VLM2Vec V2's rule for each of the 36 image datasets (its eval/image.yaml).
DATASET_RULES: dict[str, str] = {name: rule for rule, names in _NAMES.items() for name in names.split()}


def _with_marker(instruction: str, text: str = "") -> str:
    """V2's `process_input_text(instruction, text=text, add_image_token=True)` with mmfast's marker."""
    prompt = f"{instruction} {text}" if text else instruction
    return f"{IMAGE_PLACEHOLDER} {prompt}"


def _v1_text(text: str, end: str = "\n") -> str:
    return text.replace(" \n", "\n") + end


def assemble(rule: str, row: Mapping, dataset: str) -> tuple[tuple[str, str | None], list[tuple[str, str | None]]]:
    """The query (text, image path or None) and the candidates [(text, image path or None)] of one row."""
    targets = row["tgt_text"]
    if rule in ("image_cls", "image_i2t", "image_qa", "image_i2i_vg"):
        instruction = row["qry_inst"].replace(IMAGE_PLACEHOLDER, "")
        if rule in ("image_qa", "image_i2i_vg"):
            instruction = "\n" + instruction.strip()
        query = (_v1_text(_with_marker(instruction, row["qry_text"])), row["qry_img_path"] or None)
    elif rule == "image_t2i":
        text = f"{row['qry_inst']} {row['qry_text']}\n" + ("\n" if dataset == "VisDial" else "")
        query = (text, None)
    else:
        raise ValueError(f"MMEB-V2 prompt rule must be one of {', '.join(RULES)}, got {rule!r}")
    if rule in ("image_cls", "image_i2t", "image_qa"):
        return query, [(text, None) for text in targets]
    instruction = row["tgt_inst"].replace(IMAGE_PLACEHOLDER, "")
    images = [image or None for image in row["tgt_img_path"]]
    if targets[0].strip():
        texts = [_v1_text(_with_marker(f"{instruction} {caption}")) for caption in targets]
    else:
        end = "\n" if rule == "image_t2i" else ""
        texts = [_v1_text(_with_marker(instruction), end)] * len(images)
    return query, list(zip(texts, images, strict=True))
