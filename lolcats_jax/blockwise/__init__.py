"""Block-wise ("trenchcoat") attention transfer for models too large to distill jointly (reference §6).

The L layers are cut into blocks of k consecutive layers ([0, k), [k, 2k), …; the last one may be shorter).
Three stages of `python -m lolcats_jax.train` implement the path:

    collect        run the softmax model once over the distill data and store, for every block start, the raw
                   residual stream entering the block (bf16, tensorstore zarr3; `store.py`, `collect.py`)
    distill_block  train one block (or all, one after another) from its stored inputs: only its k layers'
                   weights are loaded, every layer is teacher-forced, the loss is stage 1's (`train.py`)
    stitch         gather every block's feature maps / window factors into the full model's layout as
                   `<run.dir>/stitch/final`, which `finetune` then loads (`stitch.py`)

Unlike the original scripts (reference §6.4 quirk), the store holds the *un-normalised* residual stream and a
block's first layer applies its own input norm, so the block-wise and the joint problems are identical under
teacher forcing.
"""
