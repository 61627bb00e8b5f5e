"""Stand-in for transformers' tests/utils/test_configuration_utils.py (not in its source distribution).

`ConfigTester` builds a config from these keyword arguments and checks each one was kept: values
that differ from `PreTrainedConfig`'s defaults in transformers 5.
"""

config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["BertModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
}
