"""Tests for keras_nd.artefacts: students as files, shared by jobs, resumed when killed."""

import functools
import os
import shutil
import tempfile
from unittest import mock

import testing

import keras_nd as nd
from keras_nd import artefacts
from keras_nd._keras import keras, tf

_LABEL = "k0.5"
_CANDIDATES = {_LABEL: functools.partial(nd.students.bottleneck, k=0.5)}


class ArtefactsTest(tf.test.TestCase):
  """One job distils three units; the tests compare other ways of doing the same work to it."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    x, y = testing.images(64)
    cls.x = x
    cls.teacher = testing.trained(testing.tiny_resnet(), x, y)
    cls.units = nd.split(cls.teacher)[1:4]
    cls.cache = tempfile.mkdtemp(prefix="nd_artefacts_cache_")
    cls.whole = tempfile.mkdtemp(prefix="nd_artefacts_")
    cls.trained = artefacts.distil(cls.teacher, cls.units, _CANDIDATES, cls._source(), cls.whole,
                                   **cls._settings())

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.cache, ignore_errors=True)
    shutil.rmtree(cls.whole, ignore_errors=True)
    super().tearDownClass()

  @classmethod
  def _source(cls):
    """A job's own source over every unit, on the shared cache (the first job builds it)."""
    return nd.ActivationSource(cls.teacher, cls.units, testing.dataset(cls.x), cache_dir=cls.cache,
                               verbose=0)

  @staticmethod
  def _settings():
    return dict(epochs=3, batch_size=16, learning_rate=1e-2, seed=5, verbose=0)

  def assertSameStudents(self, students):
    for hood in self.units:
      mine, reference = students[hood.name][_LABEL], self.trained[hood.name][_LABEL]
      for one, other in zip(mine.get_weights(), reference.get_weights()):
        self.assertAllClose(one, other, rtol=1e-5, atol=1e-6, msg=hood.name)

  def test_each_student_is_an_artefact_with_its_loss(self):
    store = artefacts.store(self.whole, self.teacher)
    for hood in self.units:
      self.assertTrue(artefacts.finished(store, hood.name, _LABEL))
      info = artefacts.info(store, hood.name, _LABEL)
      self.assertEqual(info["epochs"], 3)
      self.assertGreater(info["loss"], 0.0)
      self.assertEqual(info["trained_with"], 3)
    self.assertEqual(os.listdir(os.path.join(store, ".backup")), [])  # removed when finished
    loaded = artefacts.load(self.teacher, self.units, _LABEL, self.whole)
    self.assertEqual(list(loaded), self.units)
    self.assertEqual(nd.compose(self.teacher, loaded).output_shape, self.teacher.output_shape)

  def test_sharded_jobs_make_the_students_of_one_job(self):
    directory = self.get_temp_dir()
    for spec in ("1/2", "0/2"):  # separate jobs: each its own source and distiller
      mine = artefacts.shard(self.units, spec)
      logged = keras.callbacks.History()  # a callback of the caller's sees every epoch's logs
      got = artefacts.distil(self.teacher, mine, _CANDIDATES, self._source(), directory,
                             callbacks=[logged], **self._settings())
      self.assertEqual(sorted(got), sorted(h.name for h in mine))
      self.assertEqual(logged.epoch, [0, 1, 2])
      self.assertContainsSubset({f"{h.name}_{_LABEL}_loss" for h in mine}, logged.history)
    students = artefacts.load(self.teacher, self.units, _LABEL, directory)
    self.assertSameStudents({h.name: {_LABEL: m} for h, m in students.items()})

  def test_load_names_the_neighbourhoods_without_a_finished_student(self):
    directory = self.get_temp_dir()
    artefacts.distil(self.teacher, artefacts.shard(self.units, "0/2"), _CANDIDATES,
                     self._source(), directory, **dict(self._settings(), epochs=1))
    # A job killed while saving leaves only a temporary file: not finished.
    store = artefacts.store(directory, self.teacher)
    os.makedirs(os.path.join(store, self.units[1].name))
    with open(os.path.join(store, self.units[1].name, f"{_LABEL}.tmp123.keras"), "w") as f:
      f.write("partial")
    with self.assertRaisesRegex(FileNotFoundError,
                                rf"'{self.units[1].name}'.*2 of 3 finished"):
      artefacts.load(self.teacher, self.units, _LABEL, directory)

  def _distil_recording(self, directory, kill_in_epoch=None):
    """`distil` into `directory`, recording the epochs begun and the first unit's inputs of every
    batch served, by epoch; raises KeyboardInterrupt in the second batch of `kill_in_epoch`."""
    fit, train_step = nd.NeighbourhoodDistiller.fit, nd.NeighbourhoodDistiller.train_step
    epoch, served = [], {}

    class Recorder(keras.callbacks.Callback):

      def on_epoch_begin(self, index, logs=None):
        epoch.append(index)

      def on_train_batch_end(self, batch, logs=None):
        if epoch[-1] == kill_in_epoch and batch == 1:
          raise KeyboardInterrupt

    def fit_recording(distiller, *args, callbacks=None, **kwargs):
      return fit(distiller, *args, callbacks=list(callbacks or []) + [Recorder()], **kwargs)

    def step_recording(distiller, data):
      tf.py_function(lambda a: served.setdefault(epoch[-1], []).append(a.numpy()),
                     [data[self.units[0].name][0]], [])
      return train_step(distiller, data)

    with mock.patch.object(nd.NeighbourhoodDistiller, "fit", fit_recording), \
        mock.patch.object(nd.NeighbourhoodDistiller, "train_step", step_recording):
      trained = artefacts.distil(self.teacher, self.units, _CANDIDATES, self._source(),
                                 directory, **self._settings())
    return trained, epoch, served

  def test_an_interrupted_job_resumes_from_its_last_epoch_with_the_same_result(self):
    _, _, whole = self._distil_recording(os.path.join(self.get_temp_dir(), "whole"))
    directory = os.path.join(self.get_temp_dir(), "killed")
    with self.assertRaises(KeyboardInterrupt):
      self._distil_recording(directory, kill_in_epoch=1)
    resumed, epochs, served = self._distil_recording(directory)
    self.assertEqual(epochs, [1, 2])  # the first epoch is not trained again
    # Each epoch serves its own order, and a resumed epoch the batches it would have served.
    self.assertNotAllClose(whole[0], whole[1])
    for index in (1, 2):
      self.assertAllClose(served[index], whole[index])
    self.assertSameStudents(resumed)
    store = artefacts.store(directory, self.teacher)
    for hood in self.units:
      info = artefacts.info(store, hood.name, _LABEL)
      self.assertAllClose(info["loss"], artefacts.info(artefacts.store(self.whole, self.teacher),
                                                       hood.name, _LABEL)["loss"], rtol=1e-5)
      self.assertGreater(info["seconds"], 0.0)
    self.assertEqual(os.listdir(os.path.join(store, ".backup")), [])

  def test_solved_students_are_artefacts_no_worse_than_the_gradient_ones(self):
    # The exact solver's students: the solve's reconstruct, no gradient step, the
    # neighbourhood loss measured once, far below the gradient solver's; "lstsq+gradient" then
    # takes the gradient epochs from the solved weights, and ends no worse than the solve.
    directory = self.get_temp_dir()
    teacher_init = {"t": functools.partial(nd.students.bottleneck, k=0.5, init="teacher")}
    store = artefacts.store(directory, self.teacher)
    losses = {}
    for solver in artefacts.SOLVERS:
      label = {"t" + solver: teacher_init["t"]}
      artefacts.distil(self.teacher, self.units, label, self._source(), directory, solver=solver,
                       channels="greedy" if solver != "gradient" else None,
                       calibrate_steps=0 if solver != "gradient" else 50,
                       # From the solve, small steps (Adam's first steps have the size of
                       # the rate whatever the gradient).
                       **dict(self._settings(), learning_rate=1e-4 if solver != "gradient"
                              else 1e-2))
      infos = [artefacts.info(store, h.name, "t" + solver) for h in self.units]
      self.assertEqual({i["solver"] for i in infos}, {solver})
      self.assertEqual({i["epochs"] for i in infos}, {0 if solver == "lstsq" else 3})
      self.assertTrue(all(i["loss"] > 0 for i in infos))
      distiller = nd.NeighbourhoodDistiller(artefacts.load(self.teacher, self.units,
                                                           "t" + solver, directory))
      distiller.compile()
      measured = distiller.evaluate(self._source().dataset(16, shuffle=False), verbose=0,
                                    return_dict=True)
      losses[solver] = [measured[f"{h.name}_loss"] for h in self.units]
      if solver == "lstsq":  # measured the same way
        self.assertAllClose([i["loss"] for i in infos], losses[solver], rtol=1e-4)
      # A solved student keeps its solve's report: its solved layer's errors (its channels
      # chosen: none before), and its loss when nothing trained it after.
      for info in infos if solver != "gradient" else ():
        [layer] = info["solve"]["layers"].values()
        self.assertIsNone(layer["error_before"])
        # The relative error of the solved layer's output: weights that predict nothing score
        # 1; measured 0.14, 0.045 and 0.0002 for the three units.
        self.assertLess(layer["error_after"], 0.3)
        self.assertEqual(info["solve"].get("loss_after"),
                         info["loss"] if solver == "lstsq" else None)
      self.assertEqual(solver == "gradient", not any("solve" in i for i in infos))
    for solved, refined in zip(losses["lstsq"], losses["lstsq+gradient"]):
      self.assertLess(refined, solved * 1.05)
    self.assertLess(sum(losses["lstsq"]), sum(losses["gradient"]))

  def test_the_solver_is_checked(self):
    with self.assertRaisesRegex(ValueError, "solver must be one of.*'adam'"):
      artefacts.distil(self.teacher, self.units, _CANDIDATES, self._source(),
                       self.get_temp_dir(), solver="adam", **self._settings())
    with self.assertRaisesRegex(ValueError, "solves in one process"):
      artefacts.distil(self.teacher, self.units, _CANDIDATES, self._source(),
                       self.get_temp_dir(), solver="lstsq", strategy=testing.mirrored_strategy(),
                       **self._settings())

  def test_distils_under_a_mirrored_strategy(self):
    directory = self.get_temp_dir()
    got = artefacts.distil(self.teacher, self.units[:1], _CANDIDATES, self._source(), directory,
                           strategy=testing.mirrored_strategy(), **dict(self._settings(), epochs=1))
    store = artefacts.store(directory, self.teacher)
    self.assertTrue(artefacts.finished(store, self.units[0].name, _LABEL))
    self.assertGreater(artefacts.info(store, self.units[0].name, _LABEL)["loss"], 0.0)
    self.assertEqual(got[self.units[0].name][_LABEL].output_shape, self.units[0].output_shape)

  def test_shard_specs(self):
    self.assertEqual(artefacts.shard(self.units, "0/2"), [self.units[0], self.units[2]])
    self.assertEqual(artefacts.shard(self.units, "1/3"), [self.units[1]])
    for bad in ("2/2", "-1/2", "1", "a/b", "0/0"):
      with self.assertRaisesRegex(ValueError, "'i/n'"):
        artefacts.shard(self.units, bad)
    with self.assertRaisesRegex(ValueError, "4 shards for only 3"):
      artefacts.shard(self.units, "0/4")

  def test_placement_reaches_the_distiller(self):
    directory = self.get_temp_dir()
    got = artefacts.distil(self.teacher, self.units[:2], _CANDIDATES, self._source(), directory,
                           devices={self.units[0].name: "/cpu:1", self.units[1].name: "/cpu:0"},
                           **dict(self._settings(), epochs=1))
    self.assertLen(got, 2)
    with self.assertRaisesRegex(ValueError, "Unknown device"):
      artefacts.distil(self.teacher, self.units[2:], _CANDIDATES, self._source(), directory,
                       devices=["/cpu:9"], **self._settings())


if __name__ == "__main__":
  tf.test.main()
