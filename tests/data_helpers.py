"""Test-data generators shared by the tests: image folders (with planted bad files), LSUN LMDBs, shards."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def colourful_image(rng: np.random.Generator, size: int) -> Image.Image:
    """A random gradient with a bright rectangle: cheap, varied and compressible."""
    ys, xs = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    base = rng.uniform(0, 255, size=(3, 2))
    arr = np.stack([base[c, 0] * xs + base[c, 1] * ys for c in range(3)], -1) / 2
    x0, y0 = rng.integers(0, size // 2, size=2)
    w, h = rng.integers(size // 4, size // 2 + 1, size=2)
    arr[y0 : y0 + h, x0 : x0 + w] = rng.uniform(0, 255, size=3)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB")


def make_image_folder(
    root: str | Path,
    num_images: int,
    size: int = 24,
    classes: int = 0,
    seed: int = 0,
    ext: str = "png",
) -> list[Path]:
    """Write num_images valid RGB images (in `classes` sub-folders when classes > 0)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(num_images):
        folder = root / f"class{i % classes}" if classes else root
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img{i:05d}.{ext}"
        colourful_image(rng, size).save(path)
        paths.append(path)
    return paths


def jpeg_bytes(img: Image.Image, quality: int = 95, **kw) -> bytes:
    """Encode a PIL image as JPEG bytes."""
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality, **kw)
    return out.getvalue()


def make_odd_files(root: str | Path, size: int = 24) -> dict[str, list[str]]:
    """Plant bad and unusual files in root; returns {"bad": [...names], "good": [...names]}."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(123)
    good: list[str] = []
    bad: list[str] = []

    full = jpeg_bytes(colourful_image(rng, 64))
    (root / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (root / "zero.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("this is not an image\n")
    bad += ["truncated.jpg", "zero.jpg", "text.jpg"]

    Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8), "L").save(root / "gray.png")
    rgba = np.concatenate(
        [rng.integers(0, 255, (size, size, 3)), np.full((size, size, 1), 128)], -1
    ).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    colourful_image(rng, size).convert("CMYK").save(root / "cmyk.jpg")
    colourful_image(rng, size).convert("P", palette=Image.ADAPTIVE).save(root / "palette.png")
    # 16-bit grayscale at 50% intensity: a naive convert would clip it to white.
    Image.fromarray(np.full((size, size), 32768, dtype=np.uint16)).save(root / "sixteen.png")
    colourful_image(rng, size // 2).save(root / "small.bmp")
    colourful_image(rng, size).save(root / "photo.webp")
    good += [
        "gray.png",
        "rgba.png",
        "cmyk.jpg",
        "palette.png",
        "sixteen.png",
        "small.bmp",
        "photo.webp",
    ]

    # EXIF orientation 6 (rotate 90 CW to display): stored wide, left half red, right half blue;
    # shown upright it is tall with red on top.
    arr = np.zeros((size, 2 * size, 3), np.uint8)
    arr[:, :size] = (255, 0, 0)
    arr[:, size:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(root / "exif_rotated.jpg", quality=95, exif=exif.tobytes())
    good.append("exif_rotated.jpg")
    (root / "notes.txt").write_text("ignored: not an image extension\n")
    return {"bad": bad, "good": good}


def make_lsun_lmdb(path: str | Path, num_images: int, size: int = 32, seed: int = 0) -> Path:
    """Write a tiny LSUN-style LMDB (key: hex id, value: encoded JPEG/WebP bytes)."""
    import lmdb

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for i in range(num_images):
            img = colourful_image(rng, size).resize((size + 8, size))  # LSUN images are not square
            data = jpeg_bytes(img, quality=90)
            if i % 3 == 2:  # the release mixes encodings; webp exercises the generic decoder
                out = io.BytesIO()
                img.save(out, format="WEBP")
                data = out.getvalue()
            txn.put(f"{i:040x}".encode(), data)
    env.close()
    return path


def make_shards(
    out_dir: str | Path,
    num_images: int,
    size: int = 16,
    shard_size: int = 10,
    classes: int = 0,
    seed: int = 0,
    fmt: str = "jpeg",
) -> Path:
    """Generate images and prepare them into shards through the real prepare path; returns manifest."""
    from data_pipeline.prepare import prepare

    out_dir = Path(out_dir)
    src = out_dir.parent / f"{out_dir.name}-src"
    make_image_folder(src, num_images, size=size, classes=classes, seed=seed)
    return prepare(
        src,
        out_dir,
        image_size=size,
        shard_size=shard_size,
        labels=classes > 0,
        progress=False,
        fmt=fmt,
    )


def take(loader, n: int) -> list[dict]:
    """The first n batches of a loader iteration."""
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def write_wds_shards(
    out_dir: str | Path,
    num_shards: int,
    per_shard: int,
    *,
    min_size: int = 10,
    max_size: int = 40,
    classes: int = 3,
    label_names: list[str] | None = None,
    seed: int = 0,
) -> list[dict]:
    """Shards as other tools write them: webdataset's ShardWriter, no manifest.

    JPEGs of varied sizes and aspect ratios under keys with folders (`a/00001`, `b/00001`: two
    samples), each with a `.cls` label and a `.json` carrying the same label ({"label": k}, or the
    class name when label_names is given). Returns one dict per sample: key, w, h, label, jpg.
    """
    import webdataset as wds

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    samples = []
    with wds.ShardWriter(str(out_dir / "part-%04d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(num_shards * per_shard):
            w, h = (int(x) for x in rng.integers(min_size, max_size + 1, size=2))
            img = colourful_image(rng, max(w, h)).resize((w, h))
            label = int(rng.integers(0, classes))
            meta = {"label": label_names[label] if label_names else label, "width": w}
            data = jpeg_bytes(img, quality=90)
            key = f"{'ab'[i % 2]}/{i // 2:05d}"
            sink.write({"__key__": key, "jpg": data, "cls": label, "json": meta})
            samples.append({"key": key, "w": w, "h": h, "label": label, "jpg": data})
    return samples


def write_parquet(
    path: str | Path,
    samples: list[dict],
    *,
    hf_image: bool = True,
    class_names: list[str] | None = None,
    row_group_size: int = 4,
    with_label: bool = True,
) -> Path:
    """A parquet file as dataset hubs serve images: an `image` column (Hugging Face's Image
    feature, a struct of bytes and path, or plain binary) and an int `label` column, with the
    ClassLabel names in the schema metadata when class_names is given."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = [s["jpg"] for s in samples]
    if hf_image:
        image = pa.array(
            [{"bytes": d, "path": f"{i:05d}.jpg"} for i, d in enumerate(data)],
            type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
        )
    else:
        image = pa.array(data, type=pa.binary())
    columns = {"image": image}
    if with_label:
        columns["label"] = pa.array([s["label"] for s in samples], type=pa.int64())
    table = pa.table(columns)
    if class_names:
        features = {
            "image": {"_type": "Image"},
            "label": {"names": class_names, "_type": "ClassLabel"},
        }
        meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
        table = table.replace_schema_metadata(meta)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path
