"""OpenRaster (.ora): a zip whose first entry is `mimetype` (stored, uncompressed: "image/openraster"),
then stack.xml (the first <layer> is the top), the layer PNGs under data/, mergedimage.png and
Thumbnails/thumbnail.png (at most 256 px). Layers are given bottom first, as they composite."""
import io
import xml.etree.ElementTree as ET
import zipfile

from PIL import Image

from .safetensors_io import atomic_write_bytes

MIMETYPE = "image/openraster"


def _png(im):
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def composite(layers):
    """RGBA layers, bottom first -> their 'over' composite."""
    out = Image.new("RGBA", layers[0].size, (0, 0, 0, 0))
    for im in layers:
        out = Image.alpha_composite(out, im.convert("RGBA"))
    return out


def write_ora(path, layers, names=None):
    """layers: PIL RGBA images of one size, bottom first; names: one per layer (default layer_i)."""
    names = names or [f"layer_{i}" for i in range(len(layers))]
    w, h = layers[0].size
    if any(im.size != (w, h) for im in layers):
        raise ValueError("every layer must have the same size")
    root = ET.Element("image", version="0.0.3", w=str(w), h=str(h))
    stack = ET.SubElement(root, "stack")
    for name in reversed(names):       # top first
        ET.SubElement(stack, "layer", name=name, src=f"data/{name}.png", x="0", y="0", opacity="1.0",
                      visibility="visible", **{"composite-op": "svg:src-over"})
    merged = composite(layers)
    thumb = merged.copy()
    thumb.thumbnail((256, 256))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(zipfile.ZipInfo("mimetype"), MIMETYPE, compress_type=zipfile.ZIP_STORED)
        z.writestr("stack.xml", ET.tostring(root, encoding="UTF-8", xml_declaration=True),
                   compress_type=zipfile.ZIP_DEFLATED)
        for name, im in zip(names, layers):
            z.writestr(f"data/{name}.png", _png(im), compress_type=zipfile.ZIP_STORED)   # PNG is compressed
        z.writestr("mergedimage.png", _png(merged), compress_type=zipfile.ZIP_STORED)
        z.writestr("Thumbnails/thumbnail.png", _png(thumb), compress_type=zipfile.ZIP_STORED)
    atomic_write_bytes(path, buf.getvalue(), force=True)   # the caller checked what may be overwritten


def read_ora(path):
    """-> (size (w, h), [(name, PIL image)] top first, the zip's entry names in order). Checks the
    mimetype entry is first, stored and exact."""
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
        first = infos[0]
        if first.filename != "mimetype" or first.compress_type != zipfile.ZIP_STORED or \
                z.read(first).decode() != MIMETYPE:
            raise ValueError(f"{path}: not an OpenRaster file (mimetype must come first, stored)")
        root = ET.fromstring(z.read("stack.xml"))
        layers = []
        for el in root.find("stack").iter("layer"):
            im = Image.open(io.BytesIO(z.read(el.get("src"))))
            im.load()
            layers.append((el.get("name"), im))
        return (int(root.get("w")), int(root.get("h"))), layers, [i.filename for i in infos]
