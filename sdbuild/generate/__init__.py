"""Image generation over a bundle: text → image and image → image, as Apple's pipelines do it.

A ``Pipeline`` is built once from a bundle (its models load once) and then
called many times:

    pipe = Pipeline.from_bundle(Path("artifacts/builds/tiny"))
    result = pipe.generate("a photo of a cat", seed=93, steps=20, scheduler="DPM++2M")
    result.images  # float32 [N, 8H, 8W, 3] in [0, 1]

The bundle may be a build folder (``artifacts/builds/<name>``), its
``Resources/`` (Swift layout: ``TextEncoder``, ``Unet`` or ``UnetChunk1/2…``,
``VAEDecoder`` … as ``.mlpackage`` or ``.mlmodelc``), or a folder of
Python-layout packages (``Stable_Diffusion_version_<version>_<component>.mlpackage``),
including ones published by others. Models run on Core ML on macOS and on the
reference executor (float16, ``sdbuild.mil``) elsewhere.

The arithmetic around the models follows diffusers' StableDiffusionPipeline,
StableDiffusionImg2ImgPipeline and StableDiffusionXLPipeline step for step
(the schedulers are diffusers' own), so with ``rng="torch"`` a bundle's image
can be compared with diffusers' image of the same checkpoint.

The rooms, each importing only rooms below it: ``errors``; ``images`` (files in
and out), ``schedulers`` and ``request`` (the arguments in one object, checked
once before any model loads); ``discovery`` (a bundle's files) and ``runners`` (what runs a
package); ``pipeline``; ``command`` (``run_generate``). Their names are
re-exported here.
"""

from __future__ import annotations

from sdbuild.generate.errors import (  # noqa: F401
    GenerationError,
)
from sdbuild.generate.images import (  # noqa: F401
    _CLIP_MEAN,
    _CLIP_STD,
    _clip_pixels,
    _resize,
    image_file_name,
    load_image,
    load_mask,
    save_png,
    to_uint8,
)
from sdbuild.generate.request import (  # noqa: F401
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_SEED,
    MAX_STEPS,
    GenerateRequest,
    check_controlnets,
    check_settings,
)
from sdbuild.generate.schedulers import (  # noqa: F401
    SCHEDULERS,
    _SCHEDULER_ALIASES,
    make_scheduler,
    scheduler_name,
)
from sdbuild.generate.discovery import (  # noqa: F401
    BundleFiles,
    REQUIRED,
    _checkpoint_of,
    _controlnet_models,
    _find_file,
    _hub_cached,
    _python_models,
    _read_json,
    _recipe_controlnets,
    _require_controlled_unet,
    _require_encoder,
    _required,
    _same_folder,
    _swift_model,
    _swift_models,
    bundle_sizes,
    find_bundle,
    find_controlnet,
    load_tokenizer,
    pick_size,
)
from sdbuild.generate.runners import (  # noqa: F401
    ChainedRunner,
    CoreMLRunner,
    ExecutorRunner,
    ModelRunner,
    _cast,
    _chain_inputs,
    default_backend,
)
from sdbuild.generate.pipeline import (  # noqa: F401
    AESTHETIC_SCORE,
    COMPUTE_UNITS,
    Generation,
    INPAINT_CHANNELS,
    NEGATIVE_AESTHETIC_SCORE,
    NoiseSource,
    Pipeline,
    REFINER_START,
    REFINER_TIME_IDS,
    RNG_MODES,
    SCHEDULER_CONFIG,
    _check_inpainting,
    _progress_bar,
    _time_id_count,
)
from sdbuild.generate.command import (  # noqa: F401
    generate_images,
    run_generate,
)
