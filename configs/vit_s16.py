"""DINO ViT-S/16, the paper's 100-epoch recipe on ImageNet-1k (the official defaults).

Command (one TPU v4-32 / 8+ GPUs; global batch 512):

  python -m dino_jax.main --config=configs/vit_s16.py --workdir=gs://BUCKET/dino_vits16

Expected: 69.3% k-NN (20-NN) and 74.0% linear top-1 on ImageNet val after 100 epochs, as the
official README reports for this recipe (about 1.75 days on 8 V100s there). The "boosted"
recipe: --config.epochs=300 --config.loss.teacher_temp=0.07
--config.loss.warmup_teacher_temp_epochs=30 --config.model.norm_last_layer=False
--config.batch_size=1024 reaches 73.3% k-NN / 76.0% linear.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # one seed drives init, data order and every augmentation/drop-path key
  c.epochs = 100  # training length; one epoch = floor(n_train / batch_size) steps
  c.batch_size = 512  # GLOBAL batch (images, not crops); lr scales with batch_size / 256
  c.dtype = 'bfloat16'  # compute dtype; params, loss, center and EMA stay float32

  c.data = ml_collections.ConfigDict()
  c.data.source = 'tfds:imagenet2012'  # 'digits' | 'npz:PATH' | 'tfds:NAME'
  c.data.canvas_size = 256  # host resizes each image (aspect kept) into an S x S uint8 canvas
  c.data.worker_count = 8  # grain worker processes per host (0 = in the main process)
  c.data.prefetch = 2  # batches prepared ahead of the step

  c.model = ml_collections.ConfigDict()
  c.model.arch = 'vit_small'  # vit_pico | vit_tiny | vit_small | vit_base | vit_large
  c.model.patch_size = 16  # 4 | 8 | 14 | 16; crop sizes must be multiples of it
  c.model.drop_path_rate = 0.1  # student stochastic depth (teacher: 0)
  c.model.remat = False  # recompute each block in the backward pass (less memory, ~1/3 more compute)
  c.model.out_dim = 65536  # K prototypes
  c.model.norm_last_layer = True  # freeze the prototypes' scale g at 1
  c.model.head_hidden_dim = 2048
  c.model.head_bottleneck_dim = 256
  c.model.head_layers = 3

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

  c.loss = ml_collections.ConfigDict()
  c.loss.student_temp = 0.1
  c.loss.teacher_temp = 0.04  # final teacher temperature ("above 0.07 is unstable")
  c.loss.warmup_teacher_temp = 0.04  # teacher temperature at epoch 0
  c.loss.warmup_teacher_temp_epochs = 0  # linear per-epoch warmup length
  c.loss.center_momentum = 0.9

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 5e-4  # peak lr at batch 256 (linear scaling), after warmup
  c.optim.min_lr = 1e-6  # end of the cosine
  c.optim.warmup_epochs = 10
  c.optim.weight_decay = 0.04  # cosine schedule start ...
  c.optim.weight_decay_end = 0.4  # ... and end
  c.optim.clip_grad = 3.0  # per-tensor gradient norm clip (0 disables)
  c.optim.freeze_last_layer = 1  # epochs with the head's last layer frozen
  c.optim.momentum_teacher = 0.996  # teacher EMA momentum, cosine to 1
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
  c.eval_every = 12510  # steps between k-NN evals (0: only at the start and the end)
  c.knn = ml_collections.ConfigDict()
  c.knn.k = 20
  c.knn.temperature = 0.07
  c.knn.max_train = 0  # use at most this many train images for k-NN (0: all)
  c.knn.batch_size = 1024  # feature extraction batch
  return c
