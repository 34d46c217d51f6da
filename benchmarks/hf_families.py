"""Tiny random HuggingFace models of every family admin_torch.convert supports (built from configs, nothing downloaded).

``build(family)`` -> (model in eval mode, inputs with a padding mask, expected N per stack name). Used by
``benchmarks.bench_admin_hf`` (tests may import it too); ``transformers`` is imported only when a model
is built."""

import torch

V = 50
COMMON = dict(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=64)
SEQ2SEQ = dict(vocab_size=V, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
               decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
               dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0,
               eos_token_id=2, decoder_start_token_id=2)


def _ids(seed=1, shape=(2, 8)):
    ids = torch.randint(3, V, shape, generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(shape, dtype=torch.long)
    mask[1, -3:] = 0  # padding in the second sequence
    ids[1, -3:] = 1
    return ids, mask


def _encoder(cls, cfg_cls, **kw):
    def make():
        model = cls(cfg_cls(**{**COMMON, **kw}))
        ids, mask = _ids()
        return model, dict(input_ids=ids, attention_mask=mask), {"": 4}
    return make


def _bert_decoder():
    import transformers as t
    model = t.BertLMHeadModel(t.BertConfig(**COMMON, is_decoder=True, add_cross_attention=True))
    ids, mask = _ids()
    enc = torch.randn(2, 5, COMMON["hidden_size"], generator=torch.Generator().manual_seed(2))
    return model, dict(input_ids=ids, attention_mask=mask, encoder_hidden_states=enc), {"bert": 6}


def _seq2seq(cls_name, cfg_name, n=None, **kw):
    def make():
        import transformers as t
        model = getattr(t, cls_name)(getattr(t, cfg_name)(**{**SEQ2SEQ, **kw}))
        ids, mask = _ids()
        dec, _ = _ids(seed=3, shape=(2, 6))
        return model, dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec), n or {"enc": 4, "dec": 6}
    return make


def _bart_causal():
    import transformers as t
    model = t.BartForCausalLM(t.BartConfig(**SEQ2SEQ))
    ids, mask = _ids()
    return model, dict(input_ids=ids, attention_mask=mask), {"dec": 4}


def _distilbert():
    import transformers as t
    c = COMMON
    model = t.DistilBertModel(t.DistilBertConfig(vocab_size=V, dim=c["hidden_size"], n_layers=c["num_hidden_layers"],
                                                 n_heads=c["num_attention_heads"], hidden_dim=c["intermediate_size"],
                                                 dropout=0.0, attention_dropout=0.0, max_position_embeddings=64))
    ids, mask = _ids()
    return model, dict(input_ids=ids, attention_mask=mask), {"": 2 * c["num_hidden_layers"]}


def _albert(shared):
    """ALBERT with one layer applied at every depth (``shared``), or one layer per depth (no sharing)."""
    def make():
        import transformers as t
        groups = 1 if shared else COMMON["num_hidden_layers"]
        model = t.AlbertForMaskedLM(t.AlbertConfig(**COMMON, embedding_size=8, num_hidden_groups=groups))
        ids, mask = _ids()
        return model, dict(input_ids=ids, attention_mask=mask), {"": 2 * COMMON["num_hidden_layers"]}
    return make


FSMT = dict(langs=["en", "de"], src_vocab_size=V, tgt_vocab_size=V, d_model=16, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
            max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1,
            bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)


def _fsmt():
    import transformers as t
    model = t.FSMTForConditionalGeneration(t.FSMTConfig(**FSMT))
    ids, mask = _ids()
    dec, _ = _ids(seed=3, shape=(2, 6))
    return model, dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec), {"enc": 4, "dec": 6}


def _xlnet(two_stream=False, **kw):
    def make():
        import transformers as t
        c = COMMON
        model = t.XLNetLMHeadModel(t.XLNetConfig(vocab_size=V, d_model=c["hidden_size"], n_layer=c["num_hidden_layers"],
                                                 n_head=c["num_attention_heads"], d_inner=c["intermediate_size"],
                                                 dropout=0.0, **kw))
        ids, mask = _ids()
        x = dict(input_ids=ids, attention_mask=mask)
        if two_stream:  # permutation-LM pretraining: the query stream g predicts the last two tokens
            perm = torch.zeros(2, 8, 8)
            perm[:, :, -2:] = 1.0
            target = torch.zeros(2, 2, 8)
            target[:, 0, -2], target[:, 1, -1] = 1.0, 1.0
            x = dict(input_ids=ids, perm_mask=perm, target_mapping=target)
        return model, x, {"": 2 * c["num_hidden_layers"]}
    return make


FUNNEL = dict(vocab_size=V, d_model=16, n_head=2, d_head=8, d_inner=32, block_sizes=[1, 1, 1], num_decoder_layers=1,
              hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)


def _funnel(cls_name, n, **kw):
    def make():
        import transformers as t
        model = getattr(t, cls_name)(t.FunnelConfig(**{**FUNNEL, **kw}))
        ids, mask = _ids()
        return model, dict(input_ids=ids, attention_mask=mask), {"": n}
    return make


def fold_refused():
    """Families convert supports whose fold (and so save_pretrained) is refused: (builder, message)."""
    return {
        "albert_shared": (_albert(True), "shared across depth"),  # one layer applied num_hidden_layers times
        "fsmt": (_fsmt, "sinusoidal position embeddings"),
        # block 1's layer applied twice: 1 + 2 + 1 applications
        "funnel_repeats": (_funnel("FunnelBaseModel", 8, block_repeats=[1, 2, 1]), "shared across depth"),
    }


def _t(name):
    import transformers as t
    return getattr(t, name)


def families():
    return {
        "bert": lambda: _encoder(_t("BertModel"), _t("BertConfig"))(),
        "bert_decoder": _bert_decoder,
        "roberta": lambda: _encoder(_t("RobertaModel"), _t("RobertaConfig"), pad_token_id=1)(),
        "xlm_roberta": lambda: _encoder(_t("XLMRobertaModel"), _t("XLMRobertaConfig"), pad_token_id=1)(),
        "camembert": lambda: _encoder(_t("CamembertModel"), _t("CamembertConfig"), pad_token_id=1)(),
        "electra": lambda: _encoder(_t("ElectraModel"), _t("ElectraConfig"), embedding_size=8)(),
        "ernie": lambda: _encoder(_t("ErnieModel"), _t("ErnieConfig"))(),
        "roformer": lambda: _encoder(_t("RoFormerModel"), _t("RoFormerConfig"), embedding_size=8)(),
        "big_bird": lambda: _encoder(_t("BigBirdModel"), _t("BigBirdConfig"), attention_type="original_full",
                                     sep_token_id=4)(),
        "longformer": lambda: _encoder(_t("LongformerModel"), _t("LongformerConfig"), attention_window=4,
                                       pad_token_id=1, sep_token_id=2)(),
        "data2vec_text": lambda: _encoder(_t("Data2VecTextModel"), _t("Data2VecTextConfig"), pad_token_id=1)(),
        "deberta_v2": lambda: _encoder(_t("DebertaV2Model"), _t("DebertaV2Config"))(),
        "mpnet": lambda: _encoder(_t("MPNetModel"), _t("MPNetConfig"), pad_token_id=1)(),
        "distilbert": _distilbert,
        "albert": _albert(False),  # num_hidden_groups == num_hidden_layers: no sharing, fold is exact
        "xlnet": _xlnet(),
        "xlnet_two_stream": _xlnet(two_stream=True),
        # FunnelBaseModel: 3 blocks of one layer, mean pooling between them (FunnelModel: test_huggingface.py)
        "funnel_base": _funnel("FunnelForSequenceClassification", 6),
        "bart": _seq2seq("BartForConditionalGeneration", "BartConfig"),
        "bart_causal": _bart_causal,
        "blenderbot_small": _seq2seq("BlenderbotSmallForConditionalGeneration", "BlenderbotSmallConfig"),
        "led": _seq2seq("LEDForConditionalGeneration", "LEDConfig", attention_window=4,
                        max_encoder_position_embeddings=64, max_decoder_position_embeddings=64),
    }


def build(family):
    torch.manual_seed(0)
    make = families().get(family) or fold_refused()[family][0]
    model, x, n = make()
    return model.eval(), x, n


def output(out):
    """The main tensor of a HuggingFace output."""
    for key in ("logits", "last_hidden_state"):
        if key in out:
            return out[key]
    return out[0]
