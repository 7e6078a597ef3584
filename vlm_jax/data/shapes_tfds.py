"""The embedded dataset as a TFDS builder (array_record files, no TensorFlow).

``prepare(data_dir, config_name)`` generates the dataset once into ``data_dir``
and fits a SentencePiece tokenizer on the train captions beside it; later calls
reuse both. Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds

from vlm_jax.data import scenes

NAME = "vlm_shapes"
IMAGE_SIZE = 64
VOCAB_SIZE = 128  # pieces of the fitted tokenizer unless asked otherwise (config.data.vocab_size's default)


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
    num_train: int = 0
    num_test: int = 0
    seed: int = 0
    caption_noise: float = 0.0  # fraction of train captions swapped with another scene's (flagged "swapped")


class VlmShapes(tfds.core.GeneratorBasedBuilder):
    """Coloured-shape scenes with captions; see ``vlm_jax.data.scenes``."""

    VERSION = tfds.core.Version("2.1.0")
    RELEASE_NOTES = {
        "1.0.0": "First release.",
        "2.0.0": "Dense annotations: instance masks, object boxes and labels, caption phrase spans linked to "
                 "objects; the 'swapped' flag and the noisy30 configs (30 % of train captions another scene's). "
                 "Images, captions and labels of the clean configs are those of 1.0.0, bit for bit.",
        "2.1.0": "A validation split (num_test scenes drawn like train's, none of them a train scene), for choices "
                 "that must not read the test splits. Every decoded example of the other splits equals 2.0.0's.",
    }
    BUILDER_CONFIGS = [
        ShapesConfig(name="default", description="30k train scenes", num_train=30_000, num_test=1_000),
        ShapesConfig(name="tiny", description="for tests", num_train=1_024, num_test=256),
        # Noisy pairs for curation and robust objectives: test splits stay clean.
        ShapesConfig(name="noisy30", description="30k train scenes, 30 % of their captions swapped",
                     num_train=30_000, num_test=1_000, caption_noise=0.3),
        ShapesConfig(name="tiny_noisy30", description="for tests", num_train=1_024, num_test=256, caption_noise=0.3),
    ]
    DEFAULT_CONFIG_NAME = "default"

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format="png"),
                    "caption": tfds.features.Text(),
                    "label": tfds.features.ClassLabel(names=scenes.composition_names()),
                    "single_class": tfds.features.Scalar(dtype=np.bool_),
                    "kind": tfds.features.ClassLabel(names=list(scenes.SCENE_KINDS)),
                    "swapped": tfds.features.Scalar(dtype=np.bool_),  # the caption is another scene's
                    # Instance ids: object index + 1, 0 = background.
                    "mask": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 1), encoding_format="png"),
                    "objects": tfds.features.Sequence({
                        "bbox": tfds.features.BBoxFeature(),  # (y_min, x_min, y_max, x_max) in [0, 1]
                        "label": tfds.features.ClassLabel(names=scenes.composition_names()),
                    }),
                    "phrases": tfds.features.Sequence({
                        "start": tfds.features.Scalar(dtype=np.int32),  # character span of the caption
                        "end": tfds.features.Scalar(dtype=np.int32),
                        "objects": tfds.features.Scalar(dtype=np.int32),  # bit k set: names objects[k]
                    }),
                }
            ),
            supervised_keys=None,
            description=__doc__,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # procedurally generated: nothing to download
        cfg = self.builder_config
        sizes = {"train": cfg.num_train, "test_seen": cfg.num_test, "test_unseen": cfg.num_test,
                 "validation": cfg.num_test}
        return {split: self._generate_examples(split, n) for split, n in sizes.items()}

    def _generate_examples(self, split: str, num: int):
        cfg = self.builder_config
        for i, scene in scenes.iter_scenes(cfg.seed, split, num, IMAGE_SIZE):
            noisy = scenes.noisy_caption(cfg.seed, split, i, cfg.caption_noise, num) if split == "train" else None
            phrases = scene.phrases if noisy is None else ()  # spans of the scene's own caption
            yield i, {
                "image": scene.image_png,
                "caption": scene.caption if noisy is None else noisy,
                "swapped": noisy is not None,
                "label": scene.label,
                "single_class": scene.single_class,
                "kind": scene.kind,
                "mask": scene.mask_png,
                "objects": {"bbox": np.asarray([o.box for o in scene.objects], np.float32).reshape(-1, 4),
                            "label": [o.label for o in scene.objects]},
                "phrases": {"start": [p.start for p in phrases], "end": [p.end for p in phrases],
                            "objects": [sum(1 << k for k in p.objects) for p in phrases]},
            }


def builder(data_dir: str, config_name: str = "default") -> VlmShapes:
    return VlmShapes(config=config_name, data_dir=data_dir, file_format="array_record")


def tokenizer_path(data_dir: str, config_name: str = "default", vocab_size: int = VOCAB_SIZE) -> str:
    """The SentencePiece model fitted beside the data; one file per vocabulary
    size, so that changing ``config.data.vocab_size`` fits a new one instead
    of reusing a model of another size."""
    return os.path.join(data_dir, NAME, config_name, f"tokenizer_{vocab_size}.model")


def prepare(data_dir: str, config_name: str = "default", vocab_size: int = VOCAB_SIZE) -> VlmShapes:
    """Generates the dataset and its tokenizer into ``data_dir`` unless present."""
    b = builder(data_dir, config_name)
    b.download_and_prepare()
    path = tokenizer_path(data_dir, config_name, vocab_size)
    if not os.path.exists(path):
        from vlm_jax.data import tokenizers  # local import: sentencepiece only when needed

        cfg = b.builder_config
        tokenizers.train_sentencepiece(scenes.train_captions(cfg.seed, cfg.num_train), path, vocab_size=vocab_size)
    return b
