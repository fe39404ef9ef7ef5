"""Checkpoint files: the FDP noise states, one file per process, one state per device."""

import torch
from safetensors.torch import load_file

from hf_udkd.checkpoint import NOISE_STATE_NAME, load_noise_state, save_noise_state
from hf_udkd.heads import NoiseSource

MU, LOG_VAR = torch.zeros(4, 10), torch.zeros(4, 10)


def test_single_device_noise_state_keeps_its_file_format(tmp_path):
    noise = NoiseSource(seed=3)
    noise.sample(MU, LOG_VAR)
    save_noise_state(noise, str(tmp_path), process_index=1)
    assert set(load_file(tmp_path / NOISE_STATE_NAME.format(process=1))) == {"state"}
    expected = noise.sample(MU, LOG_VAR)
    resumed = NoiseSource(seed=3)
    load_noise_state(resumed, str(tmp_path), process_index=1)
    torch.testing.assert_close(resumed.sample(MU, LOG_VAR), expected)


def test_noise_states_of_several_devices_round_trip(tmp_path):
    states = {"cuda:0": torch.Generator().manual_seed(1).get_state(),
              "cuda:1": torch.Generator().manual_seed(2).get_state()}
    noise = NoiseSource(seed=0)
    noise.set_states(states)
    save_noise_state(noise, str(tmp_path), process_index=0)
    assert set(load_file(tmp_path / NOISE_STATE_NAME.format(process=0))) == {"state.cuda:0", "state.cuda:1"}
    resumed = NoiseSource(seed=0)
    load_noise_state(resumed, str(tmp_path), process_index=0)
    restored = resumed.get_states()
    assert set(restored) == set(states)
    assert all(torch.equal(restored[device], state) for device, state in states.items())


def test_no_noise_drawn_writes_no_file(tmp_path):
    save_noise_state(NoiseSource(seed=0), str(tmp_path), process_index=0)
    assert not list(tmp_path.iterdir())
