"""Ingest stage config (owned by the ingest stage; see d2mtl/stages/ingest.py).

``datasets`` is a list of per-dataset specs, one pydantic model per on-disk layout, chosen by
``format`` (a discriminated union): a wrong field of one layout is reported with its path.
The readers of each layout live in ``d2mtl.sources`` under the same format names.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Alignment = Literal["detect", "trust_crop", "detect_or_trust_crop"]
DatasetUse = Literal["train", "evaluate"]


class DatasetSpec(BaseModel):
    """Fields every layout has."""

    model_config = ConfigDict(extra="forbid")

    name: str  # dataset name: part of every sample_id, the `dataset` column and the report
    path: str  # folder, .zip / .tar / .tar.gz, or file, relative to data_root unless absolute or s3://
    domain: str | None = None  # image domain label; None: the dataset name
    alignment: Alignment = "detect"  # detect: no face = rejected row; trust_crop: resize the source crop
    limit: int | None = Field(default=None, ge=1)  # keep this many samples (lowest sample_id hashes), None = all
    # evaluate: the labels are ingested but only evaluation reads them; the teacher and the student never train
    # on them and the pseudo-label stage treats the faces as an unlabelled domain (docs/datasets.md)
    use: DatasetUse = "train"

    @property
    def domain_name(self) -> str:
        return self.domain or self.name


class UTKFaceSpec(DatasetSpec):
    format: Literal["utkface"] = "utkface"
    name: str = "utkface"
    path: str = "utkface"


class FER2013FolderSpec(DatasetSpec):
    format: Literal["fer2013_folder"] = "fer2013_folder"
    name: str = "fer2013"
    path: str = "fer2013"  # holds train/<emotion>/*.jpg and test/<emotion>/*.jpg
    alignment: Alignment = "detect_or_trust_crop"


class FER2013CsvSpec(DatasetSpec):
    format: Literal["fer2013_csv"] = "fer2013_csv"
    name: str = "fer2013"
    path: str = "fer2013"  # folder or archive holding the CSV
    csv: str = "fer2013.csv"  # columns emotion, pixels, Usage
    alignment: Alignment = "detect_or_trust_crop"


class CKPlusSpec(DatasetSpec):
    format: Literal["ckplus"] = "ckplus"
    name: str = "ckplus"
    path: str = "ckplus"  # <emotion>/S###_###_########.png
    contempt: str | None = None  # None: contempt rows are reported as dropped; or an expression class to map it to


class JAFFESpec(DatasetSpec):
    format: Literal["jaffe"] = "jaffe"
    name: str = "jaffe"
    path: str = "jaffe"  # KA.AN1.39.tiff: subject . expression+index . image number


class AdienceSpec(DatasetSpec):
    format: Literal["adience"] = "adience"
    name: str = "adience"
    path: str = "adience"  # fold_0_data.txt ... fold_4_data.txt + aligned/<user_id>/landmark_aligned_face.*
    image_dir: str = "aligned"  # folder of the per-user image folders
    val_folds: list[int] = [3]  # folds 0-4 of the official 5-fold protocol
    test_folds: list[int] = [4]

    @model_validator(mode="after")
    def _disjoint_folds(self) -> AdienceSpec:
        if set(self.val_folds) & set(self.test_folds):
            raise ValueError("val_folds and test_folds overlap")
        return self


FAIRFACE_RACES = {  # FairFace's 7 groups onto the registry's 5 (UTKFace's); see docs/datasets.md
    "White": "white",
    "Black": "black",
    "East Asian": "asian",
    "Southeast Asian": "asian",
    "Indian": "indian",
    "Latino_Hispanic": "others",
    "Middle Eastern": "others",
}


class FairFaceSpec(DatasetSpec):
    format: Literal["fairface"] = "fairface"
    name: str = "fairface"
    path: str = "fairface"  # fairface_label_{train,val}.csv + train/*.jpg, val/*.jpg
    race_map: dict[str, str | None] = Field(default_factory=lambda: dict(FAIRFACE_RACES))  # None: race left null


class RAFDBSpec(DatasetSpec):
    format: Literal["rafdb"] = "rafdb"
    name: str = "rafdb"
    path: str = "rafdb"  # holds basic/EmoLabel/list_patition_label.txt + basic/Image/aligned/ (or is basic/)
    alignment: Alignment = "detect_or_trust_crop"


class AAFSpec(DatasetSpec):
    format: Literal["aaf"] = "aaf"
    name: str = "aaf"
    path: str = "aaf"  # holds "All-Age-Faces Dataset/" ("aglined faces/" + "image sets/"), or is it
    image_sets: Literal["train_/val_", "train/val"] = "train_/val_"  # the release's two gender/split pairs
    alignment: Alignment = "detect_or_trust_crop"


class APPARealSpec(DatasetSpec):
    format: Literal["appa_real"] = "appa_real"
    name: str = "appa"
    path: str = "appa-real-release"  # gt_avg_{train,valid,test}.csv + train/, valid/, test/ *.jpg_face.jpg
    age: Literal["real", "apparent"] = "real"  # real_age or apparent_age_avg
    alignment: Alignment = "detect"  # some release crops hold no face (a scene, a wrong detection): reject those


class ImageFolderSpec(DatasetSpec):
    format: Literal["image_folder"] = "image_folder"
    task: str = "expression"  # classification task whose class names are the sub-folder names


class CsvManifestSpec(DatasetSpec):
    format: Literal["csv_manifest"] = "csv_manifest"
    manifest: str = "labels.csv"  # CSV inside `path`; image paths in it are relative to `path`
    path_column: str = "path"
    columns: dict[str, str] = Field(default_factory=dict)  # task -> CSV column; empty: columns named like tasks
    split_column: str | None = None  # optional column of train / val / test
    subject_column: str | None = None  # optional subject id column (splits by subject when set)
    # split value -> train | val | test | trainval (train with a val carve-out); e.g. {val: test} when the
    # release's val part is our test
    split_map: dict[str, Literal["train", "val", "test", "trainval"]] = Field(default_factory=dict)


DatasetConfig = Annotated[
    UTKFaceSpec
    | FER2013FolderSpec
    | FER2013CsvSpec
    | CKPlusSpec
    | JAFFESpec
    | AdienceSpec
    | FairFaceSpec
    | RAFDBSpec
    | AAFSpec
    | APPARealSpec
    | ImageFolderSpec
    | CsvManifestSpec,
    Field(discriminator="format"),
]


class SplitConfig(BaseModel):
    """Hash splits for datasets without an official one (by subject where subjects exist, else by sample)."""

    model_config = ConfigDict(extra="forbid")

    val_fraction: float = Field(default=0.1, ge=0, lt=1)
    test_fraction: float = Field(default=0.1, ge=0, lt=1)
    seed: int = 0  # changes which samples fall in which split

    @model_validator(mode="after")
    def _fractions(self) -> SplitConfig:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be below 1")
        return self


class DetectorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_score: float = Field(default=0.9, gt=0, lt=1)  # RetinaFace confidence below which a face is ignored
    min_side: int = Field(default=144, ge=16)  # upscale images whose short side is smaller (48 px FER2013: 3x)
    max_side: int = Field(default=640, ge=64)  # downscale larger images before detection (speed)


class IngestConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data_root: str = "./data"  # folder, s3:// prefix; dataset paths are relative to it
    image_size: int = Field(default=112, ge=16)  # aligned face side in pixels
    jpeg_quality: int = Field(default=95, ge=50, le=100)  # of the stored aligned faces
    datasets: list[DatasetConfig] = Field(default_factory=lambda: [UTKFaceSpec(), FER2013FolderSpec()])
    split: SplitConfig = Field(default_factory=SplitConfig)
    detector: DetectorConfig = Field(default_factory=DetectorConfig)
    shard_rows: int = Field(default=2048, ge=1)  # face rows per Parquet shard
    shuffle_seed: int = 0  # rows are written in an order shuffled by this seed: every shard mixes datasets, classes
    shuffle_rows: int = Field(default=16384, ge=1)  # faces held in memory to put them in that order (~5 kB each)
    workers: int = Field(default=0, ge=0)  # decode+detect processes; 0: one per CPU core
    chunk_size: int = Field(default=32, ge=1)  # samples per task sent to a worker
    scratch_dir: str | None = None  # where .tar archives are unpacked; None: the system temp folder

    @field_validator("datasets")
    @classmethod
    def _unique_names(cls, datasets: list[DatasetSpec]) -> list[DatasetSpec]:
        names = [d.name for d in datasets]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"dataset name(s) used twice: {', '.join(duplicated)}")
        return datasets

    @property
    def evaluate_only(self) -> list[str]:
        """Names of the datasets whose labels are for evaluation only."""
        return [d.name for d in self.datasets if d.use == "evaluate"]
