"""mlc.models: the model zoo, written with mlc.nn as one would write them with torch.nn.

    MLP                     Linear/ReLU stacks
    LeNet, DigitsCNN        small convolutional classifiers (DigitsCNN: 8x8 digits with batch norm, dropout)
    ResNet, resnet18        BasicBlock ResNets with torchvision's state_dict names, configurable width
    UNet                    down/up convolutions, ConvTranspose2d upsampling, skip concatenation
    RecurrentClassifier     an LSTM/GRU/RNN (stacked, bidirectional) over a sequence, then a linear head
    LSTMSeq2Seq             an LSTM encoder-decoder over tokens (teacher forcing)
    TransformerClassifier   a Transformer encoder over a sequence, mean-pooled, then a linear head
    TransformerSeq2Seq      an encoder-decoder Transformer over tokens, with causal and padding masks
    Generator, Discriminator a DCGAN-style pair for 8x8 images
"""
from __future__ import annotations

import numpy as np

from . import nn, ops


class MLP(nn.Module):
    def __init__(self, in_features: int, hidden=(256, 128), out_features: int = 10, dropout: float = 0.0):
        super().__init__()
        layers, width = [], in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
            width = h
        self.layers = nn.Sequential(*layers, nn.Linear(width, out_features))

    def forward(self, x):
        return self.layers(x)


class LeNet(nn.Module):
    """LeNet-5: two 5x5 convolutions with max pooling, three linear layers (28x28 or 32x32 input)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, 6, 5, padding=2 if image_size == 28 else 0), nn.ReLU(),
                                      nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
                                        nn.Linear(84, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class DigitsCNN(nn.Module):
    """For 8x8 digits (as examples/digits_cnn.ir): conv-BN-ReLU twice, max pooling, dropout, linear."""

    def __init__(self, channels=(16, 32), num_classes: int = 10, dropout: float = 0.25):
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(nn.Conv2d(1, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1), nn.ReLU(),
                                      nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2), nn.ReLU(),
                                      nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(c2 * 16, num_classes))

    def forward(self, x):
        return self.classifier(self.features(ops.reshape(x, (-1, 1, 8, 8))))


# --- ResNet --------------------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet(nn.Module):
    """torchvision's ResNet with BasicBlocks (same state_dict keys); `width` scales every layer's
    channels (64 is ResNet-18's); small_input swaps the 7x7/2 stem and max pooling for one 3x3/1
    convolution (for 8x8 or 32x32 images)."""

    def __init__(self, layers=(2, 2, 2, 2), num_classes: int = 1000, width: int = 64, in_channels: int = 3,
                 small_input: bool = False):
        super().__init__()
        if small_input:
            self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool = nn.Identity() if small_input else nn.MaxPool2d(3, 2, 1)
        planes = width
        for i, blocks in enumerate(layers):
            out = width * 2 ** i
            stage = [BasicBlock(planes, out, 1 if i == 0 else 2)] + [BasicBlock(out, out) for _ in range(blocks - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
            planes = out
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, 5):
            layer = getattr(self, f"layer{i}", None)
            if layer is not None:
                x = layer(x)
        return self.fc(ops.reshape(self.avgpool(x), (x.shape[0], -1)))


def resnet18(num_classes: int = 1000, width: int = 64, **kwargs) -> ResNet:
    return ResNet((2, 2, 2, 2), num_classes, width, **kwargs)


# --- U-Net --------------------------------------------------------------------------------------------

class DoubleConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
                                 nn.ReLU(), nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                                 nn.BatchNorm2d(out_channels), nn.ReLU())

    def forward(self, x):
        return self.net(x)


class UNet(nn.Module):
    """A small U-Net: `depth` halvings with double convolutions, a bottleneck, then ConvTranspose2d
    upsampling with the skip connection concatenated along channels, and a 1x1 output convolution."""

    def __init__(self, in_channels: int = 1, out_channels: int = 1, base: int = 16, depth: int = 2):
        super().__init__()
        widths = [base * 2 ** i for i in range(depth + 1)]
        self.down = nn.ModuleList([DoubleConv(in_channels if i == 0 else widths[i - 1], widths[i]) for i in range(depth)])
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = DoubleConv(widths[depth - 1], widths[depth])
        self.up = nn.ModuleList([nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(depth))])
        self.decode = nn.ModuleList([DoubleConv(2 * widths[i], widths[i]) for i in reversed(range(depth))])
        self.out = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, x):
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for up, block, skip in zip(self.up, self.decode, reversed(skips)):
            x = block(ops.concatenate([up(x), skip], axis=1))
        return self.out(x)


# --- sequence models -------------------------------------------------------------------------------------

RECURRENT = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


class RecurrentClassifier(nn.Module):
    """A batch-first LSTM/GRU/RNN over (N, L, features); the last step's output (both directions'
    ends when bidirectional) goes through a linear head."""

    def __init__(self, input_size: int, hidden_size: int, num_classes: int, kind: str = "lstm", num_layers: int = 1,
                 bidirectional: bool = False, dropout: float = 0.0):
        super().__init__()
        self.rnn = RECURRENT[kind](input_size, hidden_size, num_layers, batch_first=True, dropout=dropout,
                                   bidirectional=bidirectional)
        self.bidirectional = bidirectional
        self.head = nn.Linear(hidden_size * (2 if bidirectional else 1), num_classes)

    def forward(self, x):
        output, _ = self.rnn(x)
        if self.bidirectional:  # the forward direction ends at the last step, the backward one at the first
            h = output.shape[-1] // 2
            last = ops.concatenate([output[:, -1, :h], output[:, 0, h:]], axis=-1)
        else:
            last = output[:, -1]
        return self.head(last)


class LSTMSeq2Seq(nn.Module):
    """Token sequences to token sequences: an LSTM encoder's final state starts an LSTM decoder that
    reads the target shifted right (teacher forcing); logits over the vocabulary per target step."""

    def __init__(self, vocab: int, embed: int = 32, hidden: int = 64, num_layers: int = 1):
        super().__init__()
        self.embedding = nn.Embedding(vocab, embed)
        self.encoder = nn.LSTM(embed, hidden, num_layers, batch_first=True)
        self.decoder = nn.LSTM(embed, hidden, num_layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, src, tgt_in):
        _, state = self.encoder(self.embedding(src))
        out, _ = self.decoder(self.embedding(tgt_in), state)
        return self.head(out)


class TransformerClassifier(nn.Module):
    """(N, L, features) -> a linear embedding, positions, a Transformer encoder, mean over L, a head."""

    def __init__(self, input_size: int, num_classes: int, d_model: int = 64, nhead: int = 4, num_layers: int = 2,
                 dim_feedforward: int = 128, dropout: float = 0.1, max_len: int = 512):
        super().__init__()
        self.embed = nn.Linear(input_size, d_model)
        self.position = nn.PositionalEncoding(d_model, max_len, batch_first=True)
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x):
        return self.head(ops.mean(self.encoder(self.position(self.embed(x))), axis=1))


class TransformerSeq2Seq(nn.Module):
    """An encoder-decoder Transformer over tokens (batch first): embeddings scaled by sqrt(d_model),
    sinusoidal positions, a causal mask on the target and optional padding masks (True = padding)."""

    def __init__(self, vocab: int, d_model: int = 64, nhead: int = 4, num_encoder_layers: int = 2,
                 num_decoder_layers: int = 2, dim_feedforward: int = 128, dropout: float = 0.1, max_len: int = 256):
        super().__init__()
        self.d_model = d_model
        self.src_embedding = nn.Embedding(vocab, d_model)
        self.tgt_embedding = nn.Embedding(vocab, d_model)
        self.position = nn.PositionalEncoding(d_model, max_len, dropout, batch_first=True)
        self.transformer = nn.Transformer(d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward,
                                          dropout, batch_first=True)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, src, tgt_in, src_padding=None, tgt_padding=None):
        scale = float(np.sqrt(self.d_model))
        s = self.position(self.src_embedding(src) * scale)
        t = self.position(self.tgt_embedding(tgt_in) * scale)
        causal = nn.Transformer.generate_square_subsequent_mask(t.shape[1])
        out = self.transformer(s, t, tgt_mask=causal, src_key_padding_mask=src_padding, tgt_key_padding_mask=tgt_padding,
                               memory_key_padding_mask=src_padding)
        return self.head(out)

    def generate(self, src: np.ndarray, start: int, length: int) -> np.ndarray:
        """Greedy decoding: one compiled forward, fed the growing prefix (the causal mask ignores the rest)."""
        tokens = np.full((src.shape[0], length), start, np.int64)
        for t in range(length):
            logits = self(src, tokens)
            if t + 1 < length:
                tokens[:, t + 1] = logits[:, t].argmax(-1)
            else:
                last = logits[:, t].argmax(-1)
        return np.concatenate([tokens[:, 1:], last[:, None]], axis=1)


# --- GAN -----------------------------------------------------------------------------------------------

class Generator(nn.Module):
    """DCGAN-style for 8x8 images: z -> (4c, 2, 2) -> ConvTranspose2d x2 with batch norm -> tanh."""

    def __init__(self, latent: int = 32, channels: int = 32, out_channels: int = 1):
        super().__init__()
        self.channels = channels
        self.project = nn.Sequential(nn.Linear(latent, 4 * channels * 4), nn.BatchNorm1d(4 * channels * 4), nn.ReLU())
        self.net = nn.Sequential(nn.ConvTranspose2d(4 * channels, 2 * channels, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * channels),
                                 nn.ReLU(), nn.ConvTranspose2d(2 * channels, out_channels, 4, 2, 1), nn.Tanh())

    def forward(self, z):
        return self.net(ops.reshape(self.project(z), (-1, 4 * self.channels, 2, 2)))


class Discriminator(nn.Module):
    """8x8 images -> strided convolutions with LeakyReLU -> one logit."""

    def __init__(self, channels: int = 32, in_channels: int = 1):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2),
                                 nn.Conv2d(channels, 2 * channels, 4, 2, 1), nn.LeakyReLU(0.2), nn.Flatten(),
                                 nn.Linear(2 * channels * 4, 1))

    def forward(self, x):
        return self.net(x)
