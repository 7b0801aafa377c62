"""class_labels.json beside a class-conditional pipeline: written by save_pipeline, read by read_class_labels."""

import json

import pytest
import torch

from ddpm import DDPMScheduler, PipelineLoadError, UNet2DModel, load_pipeline, save_pipeline
from ddpm.pipeline_io import read_class_labels
from oracle import TINY, diffusers, single_thread  # noqa: F401  (autouse fixture)

NAMES = [f"class-{k}" for k in range(12)]  # 12 classes: keys "10" and "11" follow "9"


@pytest.fixture(scope="module")
def conditional_unet() -> UNet2DModel:
    return UNet2DModel(**dict(TINY, num_class_embeds=len(NAMES) + 1)).eval()


def test_the_file_maps_each_label_to_its_name_in_label_order_without_the_null_label(tmp_path, conditional_unet):
    save_pipeline(tmp_path, conditional_unet, DDPMScheduler(), class_names=NAMES)
    text = (tmp_path / "class_labels.json").read_text()
    assert list(json.loads(text).items()) == [(str(k), name) for k, name in enumerate(NAMES)]
    assert text.startswith('{\n  "0": "class-0",\n  "1": "class-1",') and text.endswith('"11": "class-11"\n}\n')


def test_names_read_back_as_saved_and_the_folder_loads_in_ddpm_and_diffusers(tmp_path, conditional_unet):
    save_pipeline(tmp_path, conditional_unet, DDPMScheduler(), class_names=NAMES)
    unet, _ = load_pipeline(tmp_path)
    assert read_class_labels(tmp_path, unet) == NAMES
    pipeline = diffusers.DDPMPipeline.from_pretrained(tmp_path)
    assert pipeline.unet.config.num_class_embeds == len(NAMES) + 1
    x, labels = torch.randn(2, 3, 8, 8), torch.tensor([11, 12])
    with torch.no_grad():
        assert torch.allclose(pipeline.unet(x, 5, class_labels=labels).sample, unet(x, 5, labels), atol=1e-5)


def test_names_are_written_as_given_whatever_characters_they_hold(tmp_path):
    names = ["T-shirt/top", "Ankle boot", "café \"quoted\""]
    unet = UNet2DModel(**dict(TINY, num_class_embeds=4))
    save_pipeline(tmp_path, unet, DDPMScheduler(), class_names=names)
    assert read_class_labels(tmp_path) == names


def test_a_folder_without_the_file_has_no_class_names(tmp_path, conditional_unet):
    save_pipeline(tmp_path, conditional_unet, DDPMScheduler())
    assert read_class_labels(tmp_path) is None


def test_saving_without_class_names_removes_the_file_of_an_earlier_model(tmp_path, conditional_unet):
    save_pipeline(tmp_path, conditional_unet, DDPMScheduler(), class_names=NAMES)
    save_pipeline(tmp_path, UNet2DModel(**TINY), DDPMScheduler())
    assert not (tmp_path / "class_labels.json").exists()


@pytest.mark.parametrize(("config", "names"), [(dict(TINY, num_class_embeds=13), NAMES[:11]), (TINY, NAMES[:2])],
                         ids=["one name too few", "unconditional"])
def test_class_names_that_do_not_number_the_unets_classes_are_refused_before_anything_is_written(tmp_path, config,
                                                                                                names):
    with pytest.raises(ValueError, match=f"save_pipeline: {len(names)} class names for a UNet of num_class_embeds="):
        save_pipeline(tmp_path, UNet2DModel(**config), DDPMScheduler(), class_names=names)
    assert not any(tmp_path.iterdir())


def write_file(folder, text: str) -> None:
    (folder / "class_labels.json").write_text(text)


@pytest.mark.parametrize(("text", "seen"), [
    ('{"0": "a", "2": "b"}', r"got keys \['0', '2'\]"),
    ('["a", "b"]', "got a JSON list"),
    ('{"a": "0"}', r"got keys \['a'\]"),
], ids=["a gap", "a list", "names as keys"])
def test_a_file_that_does_not_map_labels_to_names_is_a_load_error_saying_what_it_holds(tmp_path, text, seen):
    write_file(tmp_path, text)
    with pytest.raises(PipelineLoadError, match=r'must map the labels "0", "1", ... to class names, ' + seen):
        read_class_labels(tmp_path)


def test_an_unparseable_file_is_a_load_error_naming_it(tmp_path):
    write_file(tmp_path, "{not json")
    with pytest.raises(PipelineLoadError, match="cannot parse .*class_labels.json"):
        read_class_labels(tmp_path)


def test_names_that_are_not_strings_are_a_load_error(tmp_path):
    write_file(tmp_path, '{"0": "a", "1": 7}')
    with pytest.raises(PipelineLoadError, match="class names must be strings"):
        read_class_labels(tmp_path)


def test_a_file_naming_more_classes_than_the_unet_has_is_a_load_error(tmp_path, conditional_unet):
    write_file(tmp_path, json.dumps({str(k): f"c{k}" for k in range(13)}))
    with pytest.raises(PipelineLoadError, match="13 class names for a UNet of num_class_embeds=13"):
        read_class_labels(tmp_path, conditional_unet)
