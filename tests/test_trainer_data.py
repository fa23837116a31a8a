"""Training data: pool, multi-view dataset, step sampler and mixup/cutmix bookkeeping."""

import pytest
import torch

from moderation.errors import ModerationError
from trainer.augment import Augmenter
from trainer.data import ImagePool, MultiViewCollate, PoolItem, StepBatchSampler, TrainDataset
from trainer.loss import positive_mask
from trainer.synthetic import synthetic_image


@pytest.fixture()
def folder(tmp_path):
    for i in range(6):
        synthetic_image(100 + i, max_side=64).save(tmp_path / f"img{i}.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    (tmp_path / "notes.txt").write_text("ignored")
    return tmp_path


def test_pool_collects_files_and_generated(folder):
    pool = ImagePool.build([str(folder)], generated=5, max_side=48)
    assert pool.counts() == {"file": 7, "generated": 5}
    img = pool.load(0)
    assert img.mode == "RGB" and max(img.size) <= 48


def test_broken_file_is_replaced_not_fatal(folder):
    pool = ImagePool.build([str(folder)], max_side=48)
    broken = [i for i, it in enumerate(pool.items) if it.location.endswith("broken.jpg")][0]
    assert pool.load(broken).mode == "RGB"


def test_empty_pool_is_refused():
    with pytest.raises(ModerationError):
        ImagePool([])


def test_pool_from_object_store_prefix(tmp_path):
    from moderation.config import Settings
    from moderation.store import open_store

    settings = Settings.from_env({}, home=tmp_path / "home")
    store = open_store(settings)
    import io

    buf = io.BytesIO()
    synthetic_image(1, max_side=40).save(buf, "PNG")
    store.put("train/a.png", buf.getvalue())
    store.put("train/b.txt", b"x")
    pool = ImagePool.build(prefixes=["train/"], settings=settings)
    assert [it.location for it in pool.items] == ["train/a.png"]
    assert pool.load(0).size[0] > 0


def test_dataset_views_are_deterministic_per_key():
    pool = ImagePool([PoolItem("generated", str(i)) for i in range(4)], max_side=64)
    ds = TrainDataset(pool, Augmenter("wide", 32), views=3, seed=1)
    a, idx, key = ds[6]
    b, _, _ = ds[6]
    assert a.shape == (3, 3, 32, 32) and idx == 2 and key == 6
    assert torch.equal(a, b)
    assert not torch.equal(a[0], a[1])
    with pytest.raises(ModerationError):
        TrainDataset(pool, Augmenter("light", 32), views=1)


def test_sampler_splits_global_batches_and_resumes():
    full = list(StepBatchSampler(10, 4, total_steps=7, seed=3))
    assert len(full) == 7
    for keys in full:
        assert len({k % 10 for k in keys}) == 4  # no image twice in one batch
    # steps_per_epoch = 2: step 2 starts epoch 1
    assert all(k >= 10 for k in full[2]) and all(k < 10 for k in full[0])
    resumed = list(StepBatchSampler(10, 4, total_steps=7, start_step=3, seed=3))
    assert resumed == full[3:]
    r0 = list(StepBatchSampler(10, 4, total_steps=7, seed=3, rank=0, world_size=2))
    r1 = list(StepBatchSampler(10, 4, total_steps=7, seed=3, rank=1, world_size=2))
    assert [a + b for a, b in zip(r0, r1, strict=True)] == full
    with pytest.raises(ModerationError):
        StepBatchSampler(10, 3, 5, world_size=2)
    with pytest.raises(ModerationError):
        StepBatchSampler(3, 4, 5)


def test_collate_orders_views_image_major():
    items = [(torch.full((2, 3, 8, 8), float(i)), i, 100 + i) for i in range(3)]
    batch = MultiViewCollate()(items)
    assert batch.images.shape == (6, 3, 8, 8)
    assert batch.instances[:, 0].tolist() == [0, 0, 1, 1, 2, 2]
    assert (batch.instances[:, 1] == -1).all()
    assert batch.keys == [100, 101, 102]


@pytest.mark.parametrize("mode", ["mixup", "cutmix"])
def test_mixed_views_hold_two_images_and_are_positives_of_both(mode):
    items = [(torch.full((2, 3, 16, 16), float(i)), i, i) for i in range(4)]
    collate = MultiViewCollate(mixup=1.0 if mode == "mixup" else 0.0, cutmix=1.0 if mode == "cutmix" else 0.0)
    batch = collate(items)
    inst = batch.instances
    assert (inst[:, 1] >= 0).all() and (inst[:, 1] != inst[:, 0]).all()
    for row in range(8):
        values = set(batch.images[row].unique().tolist())
        assert values <= {float(inst[row, 0]), float(inst[row, 1])} or mode == "mixup"
        if mode == "mixup":
            # a convex combination of the two source values
            lo, hi = sorted((float(inst[row, 0]), float(inst[row, 1])))
            assert lo - 1e-5 <= batch.images[row].mean() <= hi + 1e-5
    pos = positive_mask(inst)
    for row in range(8):
        partner = int(inst[row, 1])
        assert pos[row, 2 * partner] and pos[row, 2 * partner + 1]
