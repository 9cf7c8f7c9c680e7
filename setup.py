"""ament_python packaging of anomaly_seg (also a plain pip package for training machines)."""

from glob import glob

from setuptools import find_packages, setup

package_name = 'anomaly_seg'
# The artifacts the package ships: the demo model (sidecar, model card, graph). Anything else in
# models/ is a user's own export and stays out of the install tree.
SHIPPED_MODELS = ['models/demo.json', 'models/demo.card.json', 'models/demo.onnx']

setup(
    name=package_name,
    version='0.1.0',
    packages=find_packages(include=['anomaly_seg_node', 'anomaly_seg_node.*', 'anomaly_seg_tools',
                                    'anomaly_seg_tools.*', 'training', 'training.*']),
    package_data={'training': ['configs/*.yaml']},
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + package_name]),
        ('share/' + package_name, ['package.xml']),
        ('share/' + package_name + '/launch', glob('launch/*.launch.py')),
        ('share/' + package_name + '/config', glob('config/*.yaml')),
        ('share/' + package_name + '/models', SHIPPED_MODELS),
    ],
    install_requires=['setuptools'],
    zip_safe=True,
    maintainer='anomaly_seg maintainers',
    maintainer_email='anomaly-seg@example.com',
    description='Open-set semantic segmentation with a dense anomaly score for vehicle cameras.',
    license='Apache-2.0',
    python_requires='>=3.10',
    # 'test' makes colcon test run pytest (without it colcon falls back to unittest).
    extras_require={'tensorrt': ['torch-tensorrt==2.14.*'], 'test': ['pytest']},
    entry_points={
        'console_scripts': [
            'anomaly_seg_node = anomaly_seg_node.node:main',
            'anomaly-seg = anomaly_seg_tools.cli:main',
        ],
    },
)
