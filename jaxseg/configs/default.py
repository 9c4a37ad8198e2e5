"""The recipe's settings (Unet-efficientnetb5, 512 px tiles, 4 folds); variants override."""
import ml_collections

from jaxseg.augment import default_augment_config


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # Data: a folder of `<id>-<count>.tfrec` files in the recipe's format.
    config.data_dir = ""
    config.image_size = 512
    config.num_folds = 4
    config.folds = "all"               # or a comma list such as "0,2"
    config.seed = 0
    config.deterministic = False       # True: reproducible data order (slower reads)
    config.shuffle_buffer = 128
    config.prefetch_batches = 2        # batches on their way to the devices ahead of the step
    config.metrics_every_steps = 10    # the host reads training metrics (progress bar, NaN
                                       # check) this many steps at a time
    config.augment = default_augment_config()
    config.tensorboard_images = 4      # validation examples shown as image | truth |
                                       # prediction in TensorBoard every epoch (0: none)
    # Whole-slide validation (jaxseg/slide_validation.py): the slides the records were cut
    # from (a glob) and their truth (RLE CSV or folder of <id>.png masks); each epoch the
    # fold's validation slides are predicted whole and scored as jaxseg.evaluate does.
    config.val_images = ""
    config.val_truth = ""
    config.monitor = "auto"            # what chooses the best epoch and stops early:
                                       # 'val_dice_coe' (the recipe's, on tiles),
                                       # 'val_slide_dice', or 'auto' (the latter when
                                       # val_images is given)

    # Model.
    config.backbone = "efficientnetb5"
    config.init_from = ""              # a folder written by `python -m jaxseg.convert`
    config.normalize_input = False     # the recipe feeds raw 0..255 pixels
    config.drop_connect_rate = 0.2
    # How layers are computed; every choice gives the same outputs and gradients.
    # 'auto' picks what is fast where it runs (BENCHMARKS.md): the first of each pair on
    # GPU/TPU, the second on CPU (jaxseg/models/build.py chooses, and says why).
    config.depthwise_impl = "auto"     # 'native' | 'shifted' (multiply-adds)
    config.conv_impl = "auto"          # 'native' | 'matmul' (1x1 convolutions)
    config.upsample_impl = "auto"      # 'native' | 'folded' (upsample + 3x3 conv as 2x2)
    config.batchnorm_impl = "auto"     # 'native' | 'fused' (BatchNorm + activation, own gradient)
    config.remat = True                # recompute elementwise work in the backward pass: less
                                       # memory, and faster on an H200 (cpu.py: off)
    config.half_precision = False      # bfloat16 compute, float32 parameters and loss

    # Optimisation.
    config.epochs = 60
    config.per_device_batch_size = 8
    config.steps_per_epoch = -1        # -1: training images // global batch, as the recipe
    config.learning_rate = 2.5e-4
    config.loss = "dice"               # or 'bce_dice', 'lovasz', 'bce_lovasz'
    config.encoder_freeze_epochs = 0   # segmentation_models' encoder_freeze pre-training
    config.plateau_factor = 0.1        # ReduceLROnPlateau on val_loss
    config.plateau_patience = 8
    config.plateau_min_delta = 1e-4
    config.min_learning_rate = 1e-5
    config.lr_schedule = "plateau"     # the recipe's; or 'cosine': linear warm-up, then cosine
                                       # to min_learning_rate at the end of `epochs`, without
                                       # ReduceLROnPlateau (jaxseg/schedules.py)
    config.warmup_epochs = 0.0         # 'cosine' warm-up from 0 to learning_rate (fractions too)
    config.early_stopping_patience = 15  # EarlyStopping on val_dice_coe
    config.precise_bn_batches = 8      # BatchNorm statistics recomputed over this many
                                       # training batches before each validation
                                       # (jaxseg/precise_bn.py, QUALITY.md); 0: the recipe's
                                       # moving averages
    config.ema_decay = 0.0             # > 0 (e.g. 0.99): validation, the best checkpoint and
                                       # prediction use a moving average of the weights
                                       # (steps.ema_update); 0: the weights themselves
    return config
