"""Description providers: the JSON format and its errors, Tux Paint and WordNet texts, Unicode names,
retrieval against a direct computation, and the honesty rule (human test descriptions = oracle)."""
from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch
from PIL import Image

from glad_core.data import Datum
from glad_core.datasets import DEMO_DATASETS
from glad_core.debian import DemoDataUnavailable
from glad_core.descriptions import (KINDS, DescriptionError, DescriptionProvider, Descriptions, WordNet,
                                    frozen_image_features, load_descriptions, make_provider, retrieve,
                                    tuxpaint_descriptions, tuxpaint_descriptions_path, unicode_descriptions)
from glad_core.paths import cache_dir

ROOT = "/data/pets/images"
TRAIN = [Datum(f"{ROOT}/cat/{i}.jpg", 0, "cat") for i in range(3)] + [Datum(f"{ROOT}/dog/{i}.jpg", 1, "dog") for i in range(3)]
TEST = [Datum(f"{ROOT}/cat/t{i}.jpg", 0, "cat") for i in range(2)] + [Datum(f"{ROOT}/dog/t{i}.jpg", 1, "dog") for i in range(2)]


def _texts(items):
    return {d.impath.removeprefix(ROOT + "/"): f"a {d.classname}, file {d.impath.removeprefix(ROOT)}" for d in items}


def _mllm(items=TRAIN + TEST, **kw) -> Descriptions:
    return Descriptions("mllm", "llava", _texts(items), classes={"cat": "a small feline", "dog": "a canine"},
                        generator="llava-1.6", question="Describe the object.", **kw)


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


# ----------------------------------------------------------------------------- the JSON format


def test_json_round_trip_and_lookup(tmp_path):
    d = _mllm()
    back = load_descriptions(d.save(tmp_path / "llava.json"))
    assert (back.kind, back.name, back.generator, back.question) == ("mllm", "llava", "llava-1.6", "Describe the object.")
    assert back.images == d.images and back.classes == d.classes
    assert back.image_texts(TEST) == ["a cat, file /cat/t0.jpg", "a cat, file /cat/t1.jpg", "a dog, file /dog/t0.jpg",
                                      "a dog, file /dog/t1.jpg"]
    assert back.class_texts(["dog", "cat"]) == ["a canine", "a small feline"]
    assert back.info()["n_images"] == 10 and back.info()["source"] == str(tmp_path / "llava.json")


def test_minimal_file_defaults_and_longest_key_wins(tmp_path):
    path = _write(tmp_path / "mine.json", {"format": "glad-descriptions", "version": 1, "generator": "qwen-vl",
                                          "question": "What is it?",
                                          "images": {"0.jpg": "short key", "cat/0.jpg": "  the cat key  "}})
    d = load_descriptions(path)
    assert d.kind == "mllm" and d.name == "mine" and d.classes == {}
    assert d.image_texts([TRAIN[0], TRAIN[3]]) == ["the cat key", "short key"]  # dog/0.jpg ends with 0.jpg


@pytest.mark.parametrize("content, message", [
    ("not json", "cannot read descriptions file"),
    ({"images": {"a.png": "x"}}, "is not a descriptions file"),
    ({"format": "glad-descriptions", "version": 2, "images": {"a.png": "x"}}, "version 2"),
    ({"format": "glad-descriptions", "version": 1, "image": {"a.png": "x"}}, "unknown keys ['image']"),
    ({"format": "glad-descriptions", "version": 1, "images": {"a.png": "x"}}, "'generator'"),
    ({"format": "glad-descriptions", "version": 1, "kind": "caption", "images": {"a.png": "x"}}, "kind 'caption'"),
    ({"format": "glad-descriptions", "version": 1, "kind": "human", "images": {"/abs/a.png": "x"}}, "relative"),
    ({"format": "glad-descriptions", "version": 1, "kind": "human", "images": {"a.png": " "}}, "non-empty text"),
    ({"format": "glad-descriptions", "version": 1, "kind": "human", "images": ["a.png"]}, "must be an object"),
    ({"format": "glad-descriptions", "version": 1, "kind": "human", "images": {}}, "no image descriptions"),
    ({"format": "glad-descriptions", "version": 1, "kind": "class", "classes": {}}, "non-empty 'classes'"),
])
def test_malformed_files_are_named(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(DescriptionError, match="bad.json") as e:
        load_descriptions(path)
    assert message in str(e.value)


def test_keys_matching_no_image_and_missing_images_are_errors():
    d = _mllm(TRAIN)
    with pytest.raises(DescriptionError, match="none of its 6 image keys matches any of the 4 images"):
        Descriptions("human", "wrong-root", {f"pets/{k}x": v for k, v in d.images.items()}).image_texts(TEST)
    with pytest.raises(DescriptionError, match=r"no text for 4 of 10 images, e\.g\. \['/data/pets/images/cat/t0.jpg'"):
        d.image_texts(TRAIN + TEST)
    with pytest.raises(DescriptionError, match=r"no 'classes' text for \['bird'\]"):
        d.class_texts(["cat", "bird"])


# ----------------------------------------------------------------------------- the honesty rule


def test_human_descriptions_train_only_by_default_and_oracle_switch():
    human = Descriptions("human", "notes", _texts(TRAIN + TEST))
    default = DescriptionProvider(human).index(TRAIN, torch.eye(6, 4))
    assert default.test == "retrieval" and default.kind == "retrieval" and not default.describe()["oracle"]
    assert default.image_texts(TRAIN, "train") == human.image_texts(TRAIN)
    test_texts = default.image_texts(TEST, "test", features=torch.eye(6, 4)[[1, 0, 3, 2]])
    assert test_texts == [human.image_texts(TRAIN)[i] for i in (1, 0, 3, 2)]  # nearest training image's text
    assert test_texts != human.image_texts(TEST)

    with pytest.raises(DescriptionError, match="oracle=True"):
        DescriptionProvider(human, test="images")
    oracle = DescriptionProvider(human, oracle=True)
    assert oracle.image_texts(TEST, "test") == human.image_texts(TEST)
    assert oracle.kind == "oracle" and oracle.describe()["oracle"] is True and oracle.name == "notes/oracle"
    assert oracle.describe() != default.describe()
    assert {default.kind, oracle.kind, DescriptionProvider(_mllm()).kind} == set(KINDS) - {"human", "class"}
    with pytest.raises(DescriptionError, match="contradicts test='retrieval'"):
        DescriptionProvider(human, test="retrieval", oracle=True)


def test_mllm_describes_test_images_and_class_modes():
    mllm = DescriptionProvider(_mllm())
    assert mllm.kind == "mllm" and mllm.test == "images" and mllm.describe()["train"]["generator"] == "llava-1.6"
    assert mllm.image_texts(TEST, "test") == _mllm().image_texts(TEST)
    assert mllm.class_texts(["cat"]) == ["a small feline"]

    human = Descriptions("human", "notes", _texts(TRAIN))
    glosses = Descriptions("class", "glosses", {}, classes={"cat": "feline", "dog": "canine"})
    by_class = DescriptionProvider(human, glosses, test="class")
    assert by_class.kind == "class" and by_class.image_texts(TRAIN, "train") == human.image_texts(TRAIN)
    with pytest.raises(DescriptionError, match="zero-shot model's prediction: pass predicted"):
        by_class.image_texts(TEST, "test")  # a test image's label is never the fallback
    predicted = ["dog", "dog", "cat", "dog"]  # the labels are cat, cat, dog, dog
    assert by_class.image_texts(TEST, "test", predicted=predicted) == ["canine", "canine", "feline", "canine"]
    assert by_class.class_texts(["dog"]) == ["canine"] and by_class.describe()["classes"]["name"] == "glosses"
    assert "zero-shot" in by_class.describe()["test"]["from"]

    only = DescriptionProvider(glosses)  # class texts alone: training images get their own class's
    assert only.kind == "class" and only.test == "class" and only.name == "glosses/class"
    assert only.image_texts(TRAIN, "train") == ["feline"] * 3 + ["canine"] * 3
    assert only.image_texts(TEST, "test", predicted=predicted) == ["canine", "canine", "feline", "canine"]
    assert only.describe()["train"] == {"kind": "class", "from": "the class text of the image's own label"}
    with pytest.raises(DescriptionError, match="needs per-image descriptions"):
        DescriptionProvider(glosses, test="retrieval")
    with pytest.raises(DescriptionError, match="contradicts test='class'"):
        DescriptionProvider(glosses, oracle=True)
    with pytest.raises(DescriptionError, match="test='class' needs class texts"):
        DescriptionProvider(human, test="class")
    with pytest.raises(DescriptionError, match="call provider.index"):
        DescriptionProvider(human).image_texts(TEST, "test", features=torch.zeros(4, 3))


def test_make_provider_from_paths(tmp_path):
    images = _mllm().save(tmp_path / "llava.json")
    classes = Descriptions("class", "glosses", {}, classes={"cat": "feline"}).save(tmp_path / "glosses.json")
    p = make_provider(str(images), str(classes))
    assert p.describe()["kind"] == "mllm" and p.class_texts(["cat"]) == ["feline"]
    assert make_provider(str(images), oracle=True).describe()["kind"] == "oracle"


# ----------------------------------------------------------------------------- retrieval


def test_retrieval_matches_direct_argmax():
    g = torch.Generator().manual_seed(0)
    bank, query = torch.randn(37, 5, generator=g), torch.randn(11, 5, generator=g)
    idx, sim = retrieve(query, bank * torch.rand(37, 1, generator=g) * 9, chunk=4)  # scale does not matter

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    for q, i, s in zip(query.tolist(), idx.tolist(), sim.tolist()):
        sims = [cos(q, b) for b in bank.tolist()]
        assert i == max(range(len(sims)), key=sims.__getitem__)
        assert s == pytest.approx(sims[i], abs=1e-5)
    with pytest.raises(DescriptionError, match="non-empty"):
        retrieve(query, torch.zeros(0, 5))


def test_frozen_image_features_ignore_lora(tmp_path, tiny_clip):
    from glad_core.methods import build
    from glad_core.config import TrainConfig
    from glad_core.runtime import image_features

    clip, preprocess, tok = tiny_clip
    items = []
    for i in range(3):
        Image.new("RGB", (32, 32), (80 * i, 40, 200 - 60 * i)).save(tmp_path / f"{i}.png")
        items.append(Datum(str(tmp_path / f"{i}.png"), i, str(i)))
    frozen = build(clip, tok, TrainConfig(method="zeroshot", device="cpu"))
    before = image_features(frozen, items, preprocess, progress=False)[0]
    model = build(clip, tok, TrainConfig(method="lora", device="cpu"))
    with torch.no_grad():
        for p in model.trainable():
            p.normal_()
    tuned = image_features(model, items, preprocess, progress=False)[0]
    assert not torch.allclose(tuned, before, atol=1e-3)
    torch.testing.assert_close(frozen_image_features(model, items, preprocess), before)


# ----------------------------------------------------------------------------- Unicode names


def test_unicode_names_of_rendered_glyphs():
    d = unicode_descriptions({"fish/0.png": "\N{TROPICAL FISH}", "insect/1.png": "\N{LADY BEETLE}",
                              "heart/2.png": "\N{HEAVY BLACK HEART}\N{VARIATION SELECTOR-16}",
                              "job/3.png": "\N{WOMAN}\N{ZERO WIDTH JOINER}\N{PERSONAL COMPUTER}",
                              "hand/4.png": "\N{THUMBS UP SIGN}\N{EMOJI MODIFIER FITZPATRICK TYPE-4}"})
    items = [Datum(f"/r/{k}", 0, "x") for k in ("fish/0.png", "insect/1.png", "heart/2.png", "job/3.png", "hand/4.png")]
    assert d.image_texts(items) == ["tropical fish", "lady beetle", "heavy black heart", "woman, personal computer",
                                    "thumbs up sign"]
    assert d.kind == "human" and "Unicode" in d.info()["generator"]
    with pytest.raises(DescriptionError, match=r"image 'odd/5.png': U\+0378 has no name"):
        unicode_descriptions({"odd/5.png": "\u0378"})


# ----------------------------------------------------------------------------- WordNet


def _tiny_wordnet(folder):
    """index.noun / data.noun in WordNet's format, with the real offsets as byte positions."""
    header = "  1 This software and database is being provided to you, the LICENSEE, by\n"
    synsets = [("dog", 'a member of the genus Canis; "the dog barked all night"'),
               ("boot", "footwear that covers the whole foot and lower leg"),
               ("box", "a (usually rectangular) container; may have a lid"),
               ("dog2", "informal term for a man")]
    data, offsets = header, {}
    for word, gloss in synsets:
        offsets[word] = f"{len(data.encode()):08d}"
        data += f"{offsets[word]} 05 n 01 {word.rstrip('2')} 0 000 | {gloss}  \n"
    (folder / "data.noun").write_text(data)
    (folder / "index.noun").write_text(header + f"boot n 1 0 1 0 {offsets['boot']}\n"
                                       f"box n 1 0 1 0 {offsets['box']}\n"
                                       f"dog n 2 1 @ 2 1 {offsets['dog']} {offsets['dog2']}\n")
    return offsets


def test_wordnet_parsing_and_fallbacks(tmp_path):
    offsets = _tiny_wordnet(tmp_path)
    wn = WordNet(wnids={"hound": "n" + offsets["dog2"]}, folder=tmp_path)
    texts = wn.class_texts(["Dog", "ankle boot", "boxes", "hound", "gizmo"])
    assert texts == ["a member of the genus Canis", "footwear that covers the whole foot and lower leg",
                     "a (usually rectangular) container; may have a lid", "informal term for a man", "gizmo"]
    assert wn.info()["fallbacks"] == {"ankle boot": "boot", "boxes": "box", "gizmo": None}
    assert DescriptionProvider(classes=wn).class_texts(["dog"]) == ["a member of the genus Canis"]


@pytest.fixture(scope="module")
def wordnet():
    wn = WordNet()
    try:
        wn.folder
    except (DemoDataUnavailable, RuntimeError) as e:
        pytest.skip(f"wordnet-base cannot be fetched here: {e}")
    return wn


def test_wordnet_real_glosses(wordnet):
    names = ["bird", "T-shirt", "ankle boot", "musical instrument", "trouser"]
    texts = wordnet.class_texts(names)
    assert texts[0] == "warm-blooded egg-laying vertebrates characterized by feathers and forelimbs modified as wings"
    assert texts[1] == "a close-fitting pullover shirt"
    assert texts[2] == "footwear that covers the whole foot and lower leg"
    assert texts[3].startswith("any of various devices or contrivances that can be used to produce musical tones")
    assert wordnet.info()["fallbacks"] == {"ankle boot": "boot"}
    tench = WordNet(wnids={"tench": "n01440764"}, folder=wordnet.folder).class_texts(["tench"])
    assert tench == ["freshwater dace-like game fish of Europe and western Asia noted for ability to survive outside water"]


# ----------------------------------------------------------------------------- Tux Paint


def _tuxpaint_available() -> bool:
    folder = cache_dir() / "data" / DEMO_DATASETS["tuxpaint"].folder
    return tuxpaint_descriptions_path().exists() or (
        (folder / DEMO_DATASETS["tuxpaint"].split_file).exists()
        and (shutil.which("apt-get") is not None or bool(os.environ.get("GLAD_DEBIAN_ROOT"))))


@pytest.mark.skipif(not _tuxpaint_available(), reason="the tuxpaint demo set or its Debian package is not here")
def test_tuxpaint_stamp_descriptions():
    from glad_core.datasets import load_dataset

    splits = load_dataset("tuxpaint")
    d = tuxpaint_descriptions()
    assert d.kind == "human" and d.name == "tuxpaint"
    items = splits.train + splits.val + splits.test
    texts = dict(zip((x.impath for x in items), d.image_texts(items)))  # every image has one
    by_key = {k.rsplit("/", 1)[-1]: v for k, v in d.images.items()}
    assert by_key["animals_mammals_apes_chimp.png"] == "A chimpanzee."
    assert by_key["plants_trees_holm_oak.png"] == "A holm oak."
    assert by_key["hobbies_music_string_guitar_electric_bass.png"] == "An electric bass guitar."
    words = sorted(len(t.split()) for t in texts.values())
    assert len(texts) == len(items) and words[len(words) // 2] <= 4
    p = DescriptionProvider(d)
    assert p.describe()["kind"] == "retrieval" and p.image_texts(splits.train, "train") == d.image_texts(splits.train)


def test_tuxpaint_writer_on_a_synthetic_package(tmp_path, monkeypatch):
    """First line of the .txt beside each stamp, keyed by the split's paths; stale or missing inputs are errors."""
    from glad_core import demo_data
    from glad_core.demo_data import write_tuxpaint_descriptions

    monkeypatch.setenv("GLAD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GLAD_DEBIAN_ROOT", str(tmp_path / "deb"))
    stamps = tmp_path / "deb/usr/share/tuxpaint/stamps/animals/birds"
    stamps.mkdir(parents=True)
    (stamps / "crow.txt").write_text("\ufeffA crow. \nfr.utf8=Un corbeau.\n", encoding="utf-8")
    (stamps / "owl.txt").write_text("An owl.\n")
    sources = {f"bird/animals_birds_{n}.png": stamps / f"{n}.png" for n in ("crow", "owl")}
    with pytest.raises(DescriptionError, match="tuxpaint demo set is not built"):
        write_tuxpaint_descriptions(sources)
    split = tmp_path / "cache/data/tuxpaint" / DEMO_DATASETS["tuxpaint"].split_file
    split.parent.mkdir(parents=True)
    split.write_text(json.dumps({"train": [[k, 0, "bird"] for k in sources], "val": [], "test": []}))
    path = write_tuxpaint_descriptions(sources)
    assert path == tuxpaint_descriptions_path() and path.parent.name == "descriptions"
    assert load_descriptions(path).images == {"bird/animals_birds_crow.png": "A crow.",
                                              "bird/animals_birds_owl.png": "An owl."}
    with pytest.raises(DescriptionError, match="does not match the current tuxpaint recipe"):
        write_tuxpaint_descriptions({"bird/animals_birds_crow.png": stamps / "crow.png"}, force=True)
    (stamps / "owl.txt").unlink()
    monkeypatch.setattr(demo_data, "content_dir", lambda package, also_in=(), dest=None: stamps.parents[1])
    with pytest.raises(DescriptionError, match="no description for tuxpaint image 'bird/animals_birds_owl.png'"):
        write_tuxpaint_descriptions(sources, force=True)


def test_prepare_writes_the_tuxpaint_descriptions_with_the_set(tmp_path, monkeypatch):
    """`prepare_demo_data` (make prepare) writes the stamps' texts beside the split it builds, and again when missing."""
    from glad_core import demo_data
    from glad_core.prepare import prepare_demo_data

    monkeypatch.setenv("GLAD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GLAD_DEBIAN_ROOT", str(tmp_path / "deb"))
    stamps = tmp_path / "deb" / demo_data.TUXPAINT.content / "animals"
    stamps.mkdir(parents=True)
    items = []
    for i, (stem, text) in enumerate([("crow", "A crow."), ("oak", "A holm oak."), ("owl", "An owl.")]):
        Image.new("RGBA", (12, 12), (200, 0, 0, 255)).save(stamps / f"{stem}.png")
        (stamps / f"{stem}.txt").write_text(f"{text}\nde.utf8=...\n")
        items.append(demo_data._Item(["train", "val", "test"][i], i, stem, f"{stem}/animals_{stem}.png",
                                     stamps / f"{stem}.png"))
    monkeypatch.setattr(demo_data, "_plan", lambda name: items)
    prepare_demo_data(names=["tuxpaint"])
    path = tuxpaint_descriptions_path()
    want = {"crow/animals_crow.png": "A crow.", "oak/animals_oak.png": "A holm oak.", "owl/animals_owl.png": "An owl."}
    assert load_descriptions(path).images == want
    path.unlink()
    prepare_demo_data(names=["tuxpaint"])  # the set is kept, its missing texts are written
    assert load_descriptions(path).images == want and tuxpaint_descriptions().images == want
