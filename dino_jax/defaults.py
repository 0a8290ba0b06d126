"""Every field of a run's config, with its default: one commented `get_config()`.

The defaults are the DINO paper's ViT-S/16 recipe (configs/vit_s16.py); every recipe in
configs/ starts from `get_config()` here (directly or through another recipe) and changes only
what it lists. They live in the package, not in configs/, so an installed copy has them too:
`config_file.from_saved` fills the fields a saved config lacks (one written by older code)
from here. CROP_PRESETS: the crop settings of the official DINO and DINOv2 pipelines, as
updates of config.crops.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # one seed drives init, data order and every augmentation/drop-path key
  c.epochs = 100  # training length; one epoch = floor(n_train / batch_size) steps
  c.batch_size = 512  # GLOBAL batch (images, not crops); lr scales with batch_size / 256
  c.dtype = 'bfloat16'  # compute dtype; params, loss, center and EMA stay float32

  c.data = ml_collections.ConfigDict()
  # digits | npz:PATH | tfds:NAME[:SPLIT] | folder:PATH | arrayrecord:DIR (README)
  c.data.source = 'tfds:imagenet2012'
  c.data.canvas_size = 256  # host resizes each image (aspect kept) into an S x S uint8 canvas
  c.data.worker_count = 8  # grain worker processes per host (0 = in the main process)
  c.data.prefetch = 2  # batches prepared ahead of the step
  c.data.epoch_length = 0  # steps per "epoch" for every schedule (0: one pass; DINOv2: 1250)

  c.model = ml_collections.ConfigDict()
  # vit_pico | vit_tiny | vit_small | vit_base | vit_large | vit_giant2; DINOv3 (ffn='swiglu'):
  # vit_small_plus | vit_large_plus | vit_huge_plus | vit_7b
  c.model.arch = 'vit_small'
  c.model.patch_size = 16  # 4 | 8 | 14 | 16; crop sizes must be multiples of it
  c.model.stem = 'patch'  # patch embedding: 'patch' (official) | 'conv' (3x3 stride-2 convs) | 'shifted'
  c.model.drop_path_rate = 0.1  # student stochastic depth (teacher: 0)
  c.model.drop_path_uniform = False  # same rate in all blocks (DINOv2) vs linspace(0, rate)
  # DINOv2 backbone options (these defaults are the DINO v1 ViT):
  c.model.layerscale = 0.0  # LayerScale gamma init on both residual branches (0: off; v2: 1e-5)
  c.model.n_registers = 0  # register tokens after CLS, no pos-embed (v2 *_reg models: 4)
  c.model.ffn = 'mlp'  # 'mlp' (GELU) | 'swiglu' (v2 ViT-g: hidden 2/3 of mlp width, ceil to 8)
  c.model.mask_token = False  # learned token for masked patches (iBOT / DINOv2 masking)
  c.model.interpolate_offset = 0.1  # pos-embed resize scale (n + offset)/S; 0: exact size
  c.model.interpolate_antialias = False  # antialiased bicubic pos-embed resize (v2 reg models)
  # DINOv3 backbone options (official student.* keys in parentheses; these defaults are off):
  c.model.pos_embed = 'learned'  # 'learned' | 'rope': axial RoPE, no pos-embed (pos_embed_type)
  c.model.rope_base = 100.0  # RoPE periods base ** (4j / head_dim) (pos_embed_rope_base)
  c.model.rope_min_period = 0.0  # both > 0: periods geometric from min to max instead of base
  c.model.rope_max_period = 0.0  # (pos_embed_rope_min_period, pos_embed_rope_max_period)
  c.model.rope_normalize = 'separate'  # coords / each axis | 'max' | 'min' (..._normalize_coords)
  c.model.rope_shift = 0.0  # training: coords + U[-s, s] per axis; 0: off (..._shift_coords)
  c.model.rope_jitter = 0.0  # training: * exp(U[-ln j, ln j]) per axis; 0: off (..._jitter_coords)
  c.model.rope_rescale = 0.0  # training: * exp(U[-ln r, ln r]); 0: off; v3: 2 (..._rescale_coords)
  c.model.untie_cls_and_patch_norms = False  # CLS + registers get their own final norm
  c.model.untie_global_and_local_cls_norm = False  # local crops' CLS + registers: own norm (7B)
  c.model.mask_k_bias = False  # no bias on keys: k third of the qkv bias masked (v3: True)
  c.model.qkv_bias = True  # (v3 7B: False)
  c.model.ln_eps = 1e-6  # LayerNorm eps (v3 norm_layer 'layernormbf16': 1e-5)
  c.model.register_init_std = 1e-6  # register init N(0, std) (v3 storage tokens: 0.02)
  # What each block keeps for the backward pass: 'none' (everything) | 'block' (only its input:
  # least memory, ~1/3 more compute) | 'dots' (the qkv/proj/MLP products; recomputes attention,
  # norms and GELU). Typed object so that saved configs' True/False still load (aliases of
  # 'block'/'none').
  c.model.remat = ml_collections.FieldReference('none', field_type=object)
  c.model.pack_crops = True  # student runs all crops as one token matrix (attention per crop)
  c.model.out_dim = 65536  # K prototypes
  c.model.norm_last_layer = True  # freeze the prototypes' scale g at 1
  c.model.head_hidden_dim = 2048
  c.model.head_bottleneck_dim = 256
  c.model.head_layers = 3
  c.model.ibot_separate_head = False  # iBOT patch tokens through their own head (v2 L/g)
  c.model.ibot_out_dim = 65536  # prototypes of the separate iBOT head
  c.model.ibot_bottleneck_dim = 256

  c.crops = ml_collections.ConfigDict()
  c.crops.global_size = 224  # 2 global crops: the teacher sees only these
  c.crops.global_scale = (0.4, 1.0)  # RandomResizedCrop area range of global crops
  c.crops.n_local = 8  # local crops, seen by the student only
  c.crops.local_size = 96
  c.crops.local_scale = (0.05, 0.4)
  c.crops.flip_p = 0.5
  c.crops.jitter_p = 0.8  # colour jitter: brightness, contrast, saturation, hue
  c.crops.brightness = 0.4
  c.crops.contrast = 0.4
  c.crops.saturation = 0.2
  c.crops.hue = 0.1
  c.crops.grayscale_p = 0.2
  c.crops.blur_sigma = (0.1, 2.0)  # Gaussian blur sigma ~ U(range), in pixels of the crop
  c.crops.blur_radius = 0  # blur kernel half-width (0: 3 * max sigma, as PIL; DINOv2: 4)
  c.crops.global1_blur_p = 1.0
  c.crops.global2_blur_p = 0.1
  c.crops.global2_solarize_p = 0.2
  c.crops.local_blur_p = 0.5
  c.crops.eval_crop_fraction = 0.875  # eval view: centre square of this fraction, resized
  # DINOv3 high-resolution adaptation: several (global, local, Gram teacher) crop-size sets, one
  # per step drawn with size_set_ratios (crops.global_crops_size, local_crops_size,
  # gram_teacher_crops_size lists, global_local_crop_pairs_ratios); one compiled step per set.
  # (): the one set (global_size, local_size, gram.teacher_size). A teacher size 0: the set's
  # global size. global_size stays the model's nominal size (learned pos-embed) and eval size.
  c.crops.size_sets = ()  # e.g. ((512, 112, 768), (768, 112, 1152), (768, 224, 1152))
  c.crops.size_set_ratios = ()  # one weight per set, normalised; (): equal

  c.loss = ml_collections.ConfigDict()
  c.loss.student_temp = 0.1
  c.loss.teacher_temp = 0.04  # final teacher temperature ("above 0.07 is unstable")
  c.loss.warmup_teacher_temp = 0.04  # teacher temperature at epoch 0
  c.loss.warmup_teacher_temp_epochs = 0  # linear warmup length
  c.loss.teacher_temp_per_step = False  # warmup per step (DINOv2) instead of per epoch (v1)
  c.loss.center_momentum = 0.9
  # Head's last layer, softmaxes and loss in chunks of this many prototypes, f32 statistics,
  # so no (rows x out_dim) f32 logits are kept (0: all at once; if smaller than out_dim and
  # model.ibot_out_dim, it must divide them).
  c.loss.prototype_chunk = 0
  c.loss.centering = 'centering'  # teacher targets: 'centering' (EMA) | 'sinkhorn_knopp'
  c.loss.koleo_weight = 0.0  # KoLeo on the student's global CLS, per crop (DINOv2: 0.1)
  c.loss.ibot_weight = 0.0  # iBOT masked-patch loss (DINOv2: 1.0; needs model.mask_token)
  c.loss.mask_probability = 0.5  # fraction of global-crop images that are masked
  c.loss.mask_ratio = (0.1, 0.5)  # stratified range of the masked fraction of a masked image
  # DINOv3 (dino.reweight_dino_local_loss): the weight of the local-crop DINO pairs (the
  # global pairs keep 1); 1 with no schedule leaves the DINO term as before. Schedule: () or
  # (start, peak, warmup_epochs, cosine_epochs): start -> peak linearly, peak -> this weight by
  # a half cosine, then this weight (dino.local_loss_weight_schedule; 7B Gram stage: 1 -> 0.5
  # as (1, 1, 1000, 1)).
  c.loss.dino_local_weight = 1.0
  c.loss.dino_local_weight_schedule = ()

  # DINOv3's Gram anchoring (official keys in parentheses): MSE between the Gram matrices of
  # the L2-normalised patch tokens of the student (global crops) and of a frozen Gram teacher.
  c.gram = ml_collections.ConfigDict()
  c.gram.weight = 0.0  # final loss weight (gram.loss_weight); 0: off, no Gram teacher at all
  # () : constant gram.weight; or (start, peak, warmup_epochs, cosine_epochs) as
  # loss.dino_local_weight_schedule, ending at gram.weight (gram.loss_weight_schedule; the 7B
  # Gram stage: (0, 0, 1000, 1) to 2.0)
  c.gram.weight_schedule = ()
  c.gram.teacher_size = 0  # Gram teacher crop size, same boxes as the global crops, no colour
  # ops (crops.gram_teacher_crops_size, no_distortions); 0: crops.global_size
  c.gram.ema_teacher = False  # targets from the EMA teacher's own patch tokens (gram.ema_teacher)
  # Gram teacher weights (gram.ckpt): a workdir or WORKDIR/checkpoints/<step> (its teacher
  # backbone) or a converted .safetensors; '': a copy of the EMA teacher the run starts from
  c.gram.init_from = ''
  c.gram.load_ema_at = -1  # step at which the EMA teacher is copied in (gram.it_load_ema_teacher)
  c.gram.rep_update = True  # copy the EMA teacher in every update_every steps (gram.rep_update)
  c.gram.update_every = 50000  # (gram.update_frequency; 10000 in the 7B Gram stage)
  c.gram.first_update = 0  # first step that may copy (gram.it_first_update)
  c.gram.max_updates = 0  # at most this many copies (gram.max_updates; 0: no limit)
  c.gram.normalized = True  # L2-normalise the patch tokens (gram.normalized)
  # one Gram matrix per image (gram.img_level, true in every official config using Gram);
  # False: one over all the global batch's tokens (officially the per-GPU batch's)
  c.gram.img_level = True
  c.gram.remove_neg = False  # zero negative similarities of both (gram.remove_neg)
  c.gram.remove_only_teacher_neg = False  # ... of the teacher only (gram.remove_only_teacher_neg)
  # the Gram teacher's feature map resized to the student's grid as torch F.interpolate does:
  # 'bicubic' | 'bilinear' (gram.global_teacher_resize_method), antialiased bicubic when
  # antialias (gram.global_teacher_resize_antialias)
  c.gram.resize = 'bicubic'
  c.gram.antialias = False

  # DINOv3 distillation: a frozen teacher (its backbone, DINO head and iBOT head, in eval mode)
  # gives the targets; the student (this config's model, with fresh heads) sees unmasked crops;
  # the model kept (teacher_params, evaluated and exported) is the EMA of the student.
  c.distill = ml_collections.ConfigDict()
  # the teacher: a workdir, WORKDIR/checkpoints/<step> (its EMA teacher), or a .safetensors
  # model file with a run config and heads; its architecture is read from the run config saved
  # with it (same model.patch_size, model.out_dim and iBOT prototypes as here); '': off
  c.distill.teacher = ''

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 5e-4  # peak lr at the reference batch, after warmup
  c.optim.lr_scaling = 'linear'  # 'linear': lr * batch / 256 | 'sqrt': lr * sqrt(batch / 1024)
  c.optim.layer_decay = 1.0  # layer-wise lr decay: block i gets decay ** (depth - i) (v2: 0.9)
  c.optim.patch_embed_lr_mult = 1.0  # extra lr factor of the patch embedding (v2: 0.2)
  c.optim.min_lr = 1e-6  # end of the cosine
  c.optim.warmup_epochs = 10
  c.optim.weight_decay = 0.04  # cosine schedule start ...
  c.optim.weight_decay_end = 0.4  # ... and end
  c.optim.clip_grad = 3.0  # gradient norm clip (0 disables) ...
  c.optim.clip_mode = 'per_param'  # ... of each tensor (v1) | 'per_module' global norm (v2)
  c.optim.freeze_last_layer = 1  # epochs with the head's last layer frozen
  c.optim.momentum_teacher = 0.996  # teacher EMA momentum, cosine to 1
  # Schedule family: 'cosine' (DINO, DINOv2: lr and wd by cosines, momentum cosine to 1) |
  # 'constant' (DINOv3: linear lr warmup from 0, then lr, weight_decay, momentum_teacher
  # constant; teacher temperature linear per step over its warmup, then constant).
  c.optim.schedules = 'cosine'
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # data-parallel size (-1: all devices not used by fsdp)
  c.mesh.fsdp = 1  # parameter-sharding size (ViT-L and up: e.g. 8 on a GPU node)
  c.mesh.min_shard_size = 2 ** 16  # elements; smaller tensors are replicated on every device
  # Multi-host: 'auto' calls jax.distributed.initialize() when a cluster is detected (Cloud
  # TPU VM, SLURM job with more than one task, JAX_COORDINATOR_ADDRESS set); 'none' never;
  # 'HOST:PORT' uses that coordinator with JAX_NUM_PROCESSES and JAX_PROCESS_ID from the env.
  c.distributed = 'auto'

  c.log_every = 50  # steps between metric lines
  c.checkpoint_every = 2500  # steps between checkpoints (and one at the end)
  c.keep_checkpoints = 3  # newest checkpoints kept ...
  c.keep_checkpoint_every = 0  # ... plus every step divisible by this (0: none)
  # Before every save the loss, gradient and parameter norms must be finite and the student's
  # parameter norm within this factor of its norm where the run started; otherwise the run
  # stops without saving (a diverging run never overwrites its good checkpoints).
  c.max_param_growth = 100.0
  # Wall-clock budget of one invocation in minutes (0: none), counted from the start of the
  # training function (build, restore, compile and evaluations included): at the first log
  # step past it the run stops stepping, evaluates, saves and says so; rerunning the command
  # goes on from there with a new budget. The schedules keep their length (`epochs`).
  c.time_limit_minutes = 0.0
  c.init_from = ''  # weights that start a new run: a workdir, WORKDIR/checkpoints/<step>, or
  # official weights converted with `python -m dino_jax.convert import` (.safetensors)
  c.eval_every = 12510  # steps between evals (0: only at the start and the end)
  c.evals = ('knn',)  # evaluators run at each eval, by name (dino_jax/evaluators/__init__.py)
  c.attention_images = 4  # teacher attention maps of this many test images to TensorBoard (0: none)
  # Collapse watchdog (after the lr warmup): one warning line (also in metrics.jsonl) when the
  # teacher entropy stays above (1 - margin) ln(out_dim) (uniform collapse) or below
  # low_margin ln(out_dim) (one prototype) for `patience` log intervals in a row.
  c.watchdog = ml_collections.ConfigDict()
  c.watchdog.margin = 0.1  # uniform band: H_t above (1 - margin) ln(out_dim)
  c.watchdog.low_margin = 0.02  # one-prototype band: H_t below low_margin ln(out_dim)
  c.watchdog.patience = 3  # consecutive log intervals inside a band before warning
  c.watchdog.stop = False  # True: stop the run (exit 1) at the warning instead of going on
  c.knn = ml_collections.ConfigDict()
  c.knn.k = 20
  c.knn.temperature = 0.07
  c.knn.max_train = 0  # use at most this many train images for k-NN (0: all)
  c.knn.batch_size = 1024  # feature extraction batch
  return c


# Crop settings of the two official pipelines, as config.crops fields. DINOv2's blur
# probabilities are the effective ones (its wrapper passes 1 - p to RandomApply, so the
# released models saw: global 1 never, global 2 0.9, locals 0.5), with torchvision's 9-tap
# kernel. 'dino' is the defaults' own. Use: config.crops.update(CROP_PRESETS['dinov2']).
CROP_PRESETS = {
    'dino': dict(global_scale=(0.4, 1.0), local_scale=(0.05, 0.4), global1_blur_p=1.0,
                 global2_blur_p=0.1, global2_solarize_p=0.2, local_blur_p=0.5,
                 blur_sigma=(0.1, 2.0), blur_radius=0),
    'dinov2': dict(global_scale=(0.32, 1.0), local_scale=(0.05, 0.32), global1_blur_p=0.0,
                   global2_blur_p=0.9, global2_solarize_p=0.2, local_blur_p=0.5,
                   blur_sigma=(0.1, 2.0), blur_radius=4),
}
