"""The multilingual text encoder projection: a user's TorchScript layer in Apple's interface.

Apple's Swift package can replace the CLIP text encoder by the system's
``NLContextualEmbedding`` (macOS 14 / iOS 17): it embeds a prompt as
[1, 256, 512] and, when the bundle holds ``MultilingualTextEncoderProjection``,
runs it to map that to the unet's ``encoder_hidden_states`` [1, C, 1, 256].
The projection itself is trained by the user and saved with
``torch.jit.save``; it maps [1, 256, 512] to [1, 256, C], as Apple's
``multilingual_projection.py`` expects, and that converter adds the transpose
to the (B, C, 1, S) layout. A file that already gives [1, C, 1, 256] is taken
as it is.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdbuild.errors import RecipeError
from sdbuild.models import MULTILINGUAL_TOKENS as EMBEDDING_TOKENS

EMBEDDING_WIDTH = 512  # NLContextualEmbedding's dimension
INPUT_NAME = "nlcontextualembeddings_output"
OUTPUT_NAME = "encoder_hidden_states"


class ProjectionToHiddenStates(torch.nn.Module):
    """The user's projection, its [1, S, C] output moved to the unet's (B, C, 1, S) layout."""

    def __init__(self, projection: torch.nn.Module, sequence_first: bool):
        super().__init__()
        self.projection = projection
        self.sequence_first = sequence_first

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[1, 256, 512] → [1, C, 1, 256]."""
        out = self.projection(embeddings)
        return out.transpose(1, 2).unsqueeze(2) if self.sequence_first else out


def load_projection(path: Path, width: int) -> ProjectionToHiddenStates:
    """Load the TorchScript file ``path`` and check it maps [1, 256, 512] to ``width`` channels.

    ``width``: the unet's ``cross_attention_dim``, which the projection's
    output feeds. Raises RecipeError (one line) for a file that is not
    TorchScript, does not take the embedding, or gives another shape.
    """
    where = f"multilingual_projection: {path}"
    try:
        # TorchScript only: its archive is read by TorchScript's own loader, no Python object is unpickled.
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # torch reports a bad archive as RuntimeError or ValueError, by version
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RecipeError(
            f"{where}: not a TorchScript file ({reason}); save the projection with torch.jit.save(torch.jit.script(module), path)"
        ) from None
    module = module.float().eval()
    probe = torch.zeros(1, EMBEDDING_TOKENS, EMBEDDING_WIDTH)
    try:
        with torch.no_grad():
            out = module(probe)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RecipeError(f"{where}: does not take the embedding [1, {EMBEDDING_TOKENS}, {EMBEDDING_WIDTH}] ({reason})") from None
    if not isinstance(out, torch.Tensor):
        raise RecipeError(f"{where}: returns {type(out).__name__}; it must return one tensor [1, {EMBEDDING_TOKENS}, C]")
    shape = tuple(out.shape)
    if shape == (1, EMBEDDING_TOKENS, width):
        return ProjectionToHiddenStates(module, sequence_first=True)
    if shape == (1, width, 1, EMBEDDING_TOKENS):
        return ProjectionToHiddenStates(module, sequence_first=False)
    raise RecipeError(
        f"{where}: gives {list(shape)} for [1, {EMBEDDING_TOKENS}, {EMBEDDING_WIDTH}]; the unet's encoder_hidden_states "
        f"need [1, {EMBEDDING_TOKENS}, {width}] (or [1, {width}, 1, {EMBEDDING_TOKENS}])"
    )
