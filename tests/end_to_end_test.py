"""The whole pipeline on a tiny ResNet: split, cache, distil, compose, fine-tune."""

import dataclasses
import json
import os

import numpy as np
import testing

from keras_nd import data
from keras_nd._keras import keras, tf
from keras_nd.experiments import quickstart


class QuickstartTest(tf.test.TestCase):

  def test_quickstart_distils_composes_fine_tunes_and_reuses_its_teacher(self):
    workdir = self.get_temp_dir()
    board = os.path.join(workdir, "tensorboard")
    config = quickstart.Config(num_train=256, num_test=64, depth=8, k=0.5, teacher_epochs=2,
                               nd_epochs=3, ft_epochs=1, batch_size=32, verbose=0,
                               tensorboard=board)
    results = quickstart.run(workdir, config)

    # Each neighbourhood's distillation loss fell over the ND epochs.
    self.assertLen(results["neighbourhood_loss"], 3)  # ResNet-8: three residual units
    for name, losses in results["neighbourhood_loss"].items():
      self.assertLess(losses[-1], losses[0], msg=name)
    # Keras's TensorBoard callback logged each of those losses, each epoch.
    logs = testing.tensorboard_logs(board)
    for name, losses in results["neighbourhood_loss"].items():
      logged = logs["nd-k0.5/train"][f"epoch_{name}_loss"]
      self.assertAllClose([logged[epoch] for epoch in range(3)], losses)
    self.assertContainsSubset({"teacher/train", "ft-k0.5/train", "summary"}, logs)
    self.assertAlmostEqual(logs["summary"]["accuracy/nd_ft"][0],
                           results["student"]["accuracy_nd_ft"], places=6)

    # The composed student is smaller, predicts, and round-trips through .keras.
    self.assertLess(results["student"]["params"], results["teacher"]["params"])
    student = keras.models.load_model(results["student"]["path"], safe_mode=True)
    x = np.zeros((2, 16, 16, 3), "float32")
    self.assertEqual(student.predict(x, verbose=0).shape, (2, 10))
    # The saved student is the one measured: it scores the same on the same test images.
    _, (x_test, y_test) = data.synthetic_images(256, 64, seed=0)
    saved = float((student.predict(x_test, verbose=0).argmax(-1) == y_test).mean())
    self.assertAlmostEqual(saved, results["student"]["accuracy_nd_ft"], places=6)
    testing.assert_over_whole_split(self, results["student"]["accuracy_nd"], 64)
    with open(os.path.join(workdir, "quickstart_results.json")) as f:
      self.assertEqual(json.load(f)["config"], dataclasses.asdict(config))

    # Run again in the same work directory, it reuses the trained teacher.
    mtime = os.path.getmtime(os.path.join(workdir, "teacher.keras"))
    again = quickstart.run(workdir, dataclasses.replace(config, nd_epochs=1, tensorboard=None))
    self.assertEqual(os.path.getmtime(os.path.join(workdir, "teacher.keras")), mtime)
    self.assertEqual(again["teacher"], results["teacher"])


if __name__ == "__main__":
  tf.test.main()
